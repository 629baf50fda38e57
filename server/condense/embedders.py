"""The networks through which matching (server/condense/matching.py) compares real and synthetic images.

- `random` (DM; Zhao & Bilen, WACV 2023): every iteration a freshly initialised ConvNet-3.
- `trained` (IDM's model sampling; Zhao et al., "Improved Distribution Matching for Dataset Condensation",
  CVPR 2023, §3.2): every iteration a network drawn from a pool of ConvNet-3s at different stages of
  training on the real side, so the embeddings carry class structure a random network lacks. IDM keeps a
  queue of up to 100 networks that it trains in the loop (10 SGD steps on 256 real images for 2 of them
  per iteration, a new one every 30 iterations, over 20,000 iterations); a refinement of a few hundred
  iterations never lets such a queue mature, so the pool here is precomputed: `runs` networks from
  different initialisations, each trained `steps` steps with IDM's optimiser (SGD lr 0.01, momentum 0.9,
  weight decay 5e-4, batch 256, no augmentation) and kept every `every` steps, from the untrained
  network (step 0, DM's case) to the last. Each snapshot carries its accuracy on a held batch of the
  real side, which weighs IDM's class-aware regulariser (matching.py `ce_weight`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared.cache import fingerprint
from shared.device import autocast
from shared.models.students import ConvNet
from shared.progress import progress


@dataclass(frozen=True)
class PoolPlan:
    """How the `trained` pool is made: `runs` initialisations x snapshots every `every` of `steps` steps."""
    runs: int = 2
    steps: int = 200
    every: int = 20
    lr: float = 0.01
    batch: int = 256


class RandomNetworks:
    """DM: one ConvNet-3, re-initialised in place before every draw; it has no accuracy to report."""

    def __init__(self, net: ConvNet, gen: torch.Generator):
        self.net, self.gen = net, gen
        self.layers = [m for m in net.modules() if hasattr(m, "reset_parameters") and m is not net]

    def draw(self) -> tuple[ConvNet, float | None]:
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.gen)))
        for layer in self.layers:
            layer.reset_parameters()
        return self.net, None


class TrainedNetworks:
    """IDM's model sampling from a precomputed pool of snapshots; `draw` loads one into the shared net."""

    def __init__(self, net: ConvNet, gen: torch.Generator, snapshots: list[tuple[dict, float]]):
        self.net, self.gen, self.snapshots = net, gen, snapshots

    def draw(self) -> tuple[ConvNet, float]:
        state, accuracy = self.snapshots[int(torch.randint(0, len(self.snapshots), (1,), generator=self.gen))]
        self.net.load_state_dict(state)
        return self.net, accuracy

    @property
    def accuracies(self) -> list[float]:
        return [a for _, a in self.snapshots]


@torch.no_grad()
def held_accuracy(net: ConvNet, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    """Percent of `images` that `net` classifies as `labels` (IDM weighs by accuracy in percent)."""
    with autocast(device, cpu_bf16=True):
        return float((net(images).argmax(1) == labels).float().mean()) * 100


def train_snapshots(real_images: torch.Tensor, real_labels: torch.Tensor, num_classes: int, width: int,
                    plan: PoolPlan, device: torch.device, gen: torch.Generator) -> list[tuple[dict, float]]:
    """`plan.runs` ConvNet-3s trained on the real side; a (state on `device`, held accuracy %) every
    `plan.every` steps, step 0 included. The held batch (1,024 images, at most a fifth of the real side) is
    drawn once and never trained on."""
    order = torch.randperm(len(real_images), generator=gen)
    n_held = min(1024, len(real_images) // 5)
    held, train = order[:n_held], order[n_held:]
    held_x, held_y = real_images[held].to(device), real_labels[held].to(device)
    c_img, side = real_images.shape[1], real_images.shape[-1]
    snapshots = []
    for run in range(plan.runs):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        net = ConvNet(c_img, num_classes, width, 3, side).to(device)
        opt = torch.optim.SGD(net.parameters(), lr=plan.lr, momentum=0.9, weight_decay=5e-4)
        for step in progress(range(plan.steps + 1), desc=f"matching networks {run + 1}/{plan.runs}", unit="step"):
            if step % plan.every == 0:
                net.eval()
                state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                snapshots.append((state, held_accuracy(net, held_x, held_y, device)))
                net.train()
            if step == plan.steps:
                break
            idx = train[torch.randint(0, len(train), (plan.batch,), generator=gen)]
            with autocast(device, cpu_bf16=True):
                loss = F.cross_entropy(net(real_images[idx].to(device)).float(), real_labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return snapshots


NETWORKS = ("random", "trained")
NETWORK_FIELDS = ("networks", "ce_weight", "pool_seconds", "pool_accuracies")   # what a refinement reports of them
_POOLS: dict = {}          # (real side, labels, plan, width, seed) -> snapshots: one pool per process and real side


def trained_pool(real_images: torch.Tensor, real_labels: torch.Tensor, num_classes: int, width: int,
                 plan: PoolPlan, device: torch.device, seed: int) -> list[tuple[dict, float]]:
    """`train_snapshots` from the pool's own generator (`seed`), trained once per process for one real side:
    several refinements of the same pool in one run (bench arms, IPCs) share it."""
    key = (fingerprint(real_images), fingerprint(real_labels), plan, width, seed, str(device))
    if key not in _POOLS:
        _POOLS.clear()                                     # keep one pool in memory
        gen = torch.Generator().manual_seed(seed + 7919)
        _POOLS[key] = train_snapshots(real_images, real_labels, num_classes, width, plan, device, gen)
    return _POOLS[key]


def network_sampler(kind: str, real_images: torch.Tensor, real_labels: torch.Tensor, num_classes: int,
                    width: int, device: torch.device, gen: torch.Generator, seed: int = 0,
                    plan: PoolPlan | None = None):
    """The sampler `kind` names (`NETWORKS`), on `device`. Draws come from `gen`; the pool trains from its
    own generator (`seed`), so both kinds see the same real batches and augmentations in a seeded loop."""
    if kind not in NETWORKS:
        raise ValueError(f"unknown matching networks '{kind}'; choose one of: {', '.join(NETWORKS)}")
    c_img, side = real_images.shape[1], real_images.shape[-1]
    net = ConvNet(c_img, num_classes, width, 3, side).to(device).requires_grad_(False)
    if kind == "random":
        return RandomNetworks(net, gen)
    snapshots = trained_pool(real_images, real_labels, num_classes, width, plan or PoolPlan(), device, seed)
    net.eval()
    return TrainedNetworks(net, gen, snapshots)
