"""Coreset baselines of the dataset-distillation tables (DC, Zhao et al., ICLR 2021), chosen per class in
the feature space of a ConvNet-3 trained on the whole training set:
- herding (Welling, ICML 2009): greedily add the image that brings the running mean of the chosen
  features closest to the class mean;
- k-center (Sener & Savarese, ICLR 2018): start from the image nearest the class mean, then greedily
  add the image farthest from everything chosen so far."""
from __future__ import annotations

import torch


def _per_class(features: torch.Tensor, labels: torch.Tensor, ipc: int, pick) -> torch.Tensor:
    out = []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        out.append(idx[pick(features[idx].double(), min(ipc, len(idx)))])
    return torch.cat(out)


def _herding(f: torch.Tensor, k: int) -> torch.Tensor:
    mu, total, chosen = f.mean(0), torch.zeros_like(f[0]), []
    available = torch.ones(len(f), dtype=torch.bool)
    for j in range(k):
        gap = (mu[None] - (total[None] + f) / (j + 1)).norm(dim=1)
        gap[~available] = float("inf")
        i = int(gap.argmin())
        chosen.append(i)
        available[i] = False
        total += f[i]
    return torch.tensor(chosen)


def _k_center(f: torch.Tensor, k: int) -> torch.Tensor:
    first = int((f - f.mean(0)).norm(dim=1).argmin())
    chosen, dist = [first], (f - f[first]).norm(dim=1)
    for _ in range(k - 1):
        i = int(dist.argmax())
        chosen.append(i)
        dist = torch.minimum(dist, (f - f[i]).norm(dim=1))
    return torch.tensor(chosen)


def herding(features: torch.Tensor, labels: torch.Tensor, ipc: int) -> torch.Tensor:
    """Indices of `ipc` images per class."""
    return _per_class(features, labels, ipc, _herding)


def k_center(features: torch.Tensor, labels: torch.Tensor, ipc: int) -> torch.Tensor:
    return _per_class(features, labels, ipc, _k_center)
