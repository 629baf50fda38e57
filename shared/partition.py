"""Deterministic partitioning of a labelled set across K clients: IID or Dirichlet(alpha) non-IID."""
from __future__ import annotations

import numpy as np


def partition_iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_clients)]


def partition_dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                        min_size: int = 1) -> list[np.ndarray]:
    """Per class, split its indices across clients in proportions drawn from Dirichlet(alpha).

    Redraws (same seeded stream) until every client holds at least `min_size` examples, the usual
    practice (Hsu et al. 2019); smaller alpha means more skew.
    """
    if alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    labels = np.asarray(labels)
    if len(labels) < num_clients * min_size:
        raise ValueError(f"{len(labels)} examples cannot give {num_clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        sizes = [sum(len(c) for c in p) for p in parts]
        if min(sizes) >= min_size:
            return [np.sort(np.concatenate(p).astype(np.int64)) for p in parts]
    raise RuntimeError(f"could not draw a Dirichlet({alpha}) split with {min_size}+ examples per client")


def partition(labels: np.ndarray, num_clients: int, *, iid: bool, alpha: float, seed: int) -> list[np.ndarray]:
    if num_clients < 1:
        raise ValueError(f"need at least one client, got {num_clients}")
    return partition_iid(labels, num_clients, seed) if iid else partition_dirichlet(labels, num_clients, alpha, seed)
