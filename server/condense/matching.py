"""Distribution matching (DM; Zhao & Bilen, WACV 2023) for any parameterisation of a synthetic set.

Each iteration draws a ConvNet-3 (width 128, instance norm): freshly initialised as DM does, or a snapshot
of one trained on the real side as IDM does (server/condense/embedders.py); for every class c the
mean embedding of a real batch (256 images) and of the synthetic images of class c, both under one
siamese DSA draw, are pulled together: L = sum_c || mean f(A(real_c)) - mean f(A(syn_c)) ||^2.

The per-class comparison is an objective from `MATCH_OBJECTIVES`:
- `mean`: DM's class-mean match above;
- `mmd`: the squared maximum mean discrepancy under a Gaussian kernel, as M3D (Zhang et al., AAAI 2024)
  matches distributions rather than first moments: MMD^2 = E k(r, r') + E k(s, s') - 2 E k(r, s) per
  class, k a sum of three Gaussians whose bandwidths are 0.5, 1 and 2 x the median squared distance
  between the class's real embeddings (the median heuristic), summed over classes.

What is optimised is a `Parameterisation`:
- pixels (the DM baseline; benchmarks/dm.py): SGD, momentum 0.5, DM's image learning rate 1 in its
  normalised pixel units, which is (2 sigma)^2 = 0.5 in our [-1, 1] units (x = 2 sigma x_norm + c,
  sigma = 0.353 for Fashion-MNIST; the instance-normed ConvNet is near-invariant to the input scale);
- the chain's final latents through the frozen decoder, as GLaD (Cazenavette et al., CVPR 2023) and
  LD3M optimise a generator's latents (server/condense/refine.py).
With trained networks, IDM's class-aware regulariser can be added (`ce_weight`): the cross-entropy of the
synthetic images' logits under the drawn network, weighted by its accuracy.
Several sets (seeds, IPCs, variants) run in one loop, sharing each iteration's network and real
batch; each set follows DM's update exactly, and the seeds' sets are correlated through those draws.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from server.condense.embedders import PoolPlan, network_sampler
from shared.augment import apply_dsa, draw_dsa
from shared.device import autocast
from shared.progress import progress
from shared.registry import Registry

MATCH_OBJECTIVES: Registry = Registry("matching objective")


@MATCH_OBJECTIVES.register("mean")
def class_mean_loss(real: torch.Tensor, fake: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """DM: sum over the classes present of || mean real_c - mean fake_c ||^2; real (k, per, d), fake (n, d)."""
    k = real.shape[0]
    sums = torch.zeros(k, fake.shape[1], device=fake.device).index_add_(0, classes, fake)
    counts = torch.bincount(classes, minlength=k)
    present = counts > 0
    return (real.mean(1) - sums / counts.clamp_min(1)[:, None])[present].pow(2).sum()


def _gaussian_kernel(sq_dist: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
    return sum(torch.exp(-sq_dist / (scale * bandwidth)) for scale in (0.5, 1.0, 2.0))


@MATCH_OBJECTIVES.register("mmd")
def class_mmd_loss(real: torch.Tensor, fake: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """M3D: sum over the classes present of the Gaussian-kernel MMD^2 between real_c and fake_c. The
    real-real term holds no parameter: it is computed once, without a graph, from the distances that also
    set the bandwidth."""
    loss = fake.new_zeros(())
    for c in classes.unique().tolist():
        r, f = real[c], fake[classes == c]
        with torch.no_grad():
            d_rr = torch.cdist(r, r).pow(2)
            bandwidth = d_rr[d_rr > 0].median() if bool((d_rr > 0).any()) else d_rr.new_ones(())
            k_rr = _gaussian_kernel(d_rr, bandwidth).mean()
        loss = loss + (k_rr + _gaussian_kernel(torch.cdist(f, f).pow(2), bandwidth).mean()
                       - 2 * _gaussian_kernel(torch.cdist(r, f).pow(2), bandwidth).mean())
    return loss


@dataclass
class Parameterisation:
    """`params` (the tensor optimised), `render(params)` -> training images (n, C, S, S), and `classes`
    (n,) the class of each rendered image; `optimizer` builds its optimiser."""
    name: str
    params: torch.Tensor
    render: Callable[[torch.Tensor], torch.Tensor]
    classes: torch.Tensor
    optimizer: Callable[[list], torch.optim.Optimizer]
    losses: list = field(default_factory=list)


def _real_batch(by_class: list[torch.Tensor], per: int, gen: torch.Generator) -> torch.Tensor:
    return torch.cat([idx[torch.randint(0, len(idx), (per,), generator=gen)] for idx in by_class])


def class_ce_loss(logits: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """IDM's class-aware regulariser: the sum over the classes present of the mean cross-entropy of that
    class's synthetic images (IDM steps each class on its own mean)."""
    ce = F.cross_entropy(logits.float(), classes, reduction="none")
    sums = torch.zeros(num_classes, device=ce.device).index_add_(0, classes, ce)
    counts = torch.bincount(classes, minlength=num_classes)
    return (sums / counts.clamp_min(1))[counts > 0].sum()


def match(sets: list[Parameterisation], real_images: torch.Tensor, real_labels: torch.Tensor, num_classes: int,
          iterations: int, device: torch.device, real_batch: int = 256, seed: int = 0, width: int = 128,
          desc: str = "distribution matching", log_every: int = 100, time_limit: float = float("inf"),
          objective: str = "mean", networks: str = "random", ce_weight: float = 0.0,
          pool: PoolPlan | None = None) -> dict:
    """Optimise every set in place for `iterations`, or until `time_limit` seconds have passed (the
    iterations run are returned), comparing classes by `objective` (`MATCH_OBJECTIVES`) through the
    `networks` (server/condense/embedders.py). With `ce_weight` > 0 (trained networks only) IDM's
    class-aware term is added: ce_weight x the drawn network's held accuracy (%) x `class_ce_loss`.
    Returns the time and each set's loss curve."""
    class_loss = MATCH_OBJECTIVES[objective]
    if ce_weight and networks != "trained":
        raise ValueError(f"ce_weight {ce_weight} needs trained matching networks: a random network's logits "
                         "carry no class; set networks='trained' (--refine-networks trained) or ce_weight 0")
    start = time.time()
    gen = torch.Generator().manual_seed(seed)
    by_class = [torch.nonzero(real_labels == c).flatten() for c in range(num_classes)]
    per = min(real_batch, *(len(i) for i in by_class))
    opts = [s.optimizer([s.params]) for s in sets]
    # synthetic image j of class c takes the augmentation of real image (c, j mod per)
    slots = []
    for s in sets:
        cls = s.classes.cpu()
        rank = torch.zeros_like(cls)
        for c in range(num_classes):
            at = torch.nonzero(cls == c).flatten()
            rank[at] = torch.arange(len(at))
        slots.append(cls * per + rank % per)
    sampler = network_sampler(networks, real_images, real_labels, num_classes, width, device, gen, seed, pool)
    pool_seconds = time.time() - start
    done = 0
    for it in progress(range(iterations), desc=desc, unit="it"):
        if time.time() - start > time_limit:
            break
        done = it + 1
        net, accuracy = sampler.draw()
        idx = _real_batch(by_class, per, gen)
        draw = draw_dsa(num_classes * per, gen, torch.arange(num_classes).repeat_interleave(per))
        with torch.no_grad(), autocast(device, cpu_bf16=True):
            real = net.features(apply_dsa(real_images[idx].to(device), draw)).flatten(1).float()
        real = real.view(num_classes, per, -1)
        for s, opt, slot in zip(sets, opts, slots):
            images = s.render(s.params)
            with autocast(device, cpu_bf16=True):
                fake = net.features(apply_dsa(images, draw.subset(slot))).flatten(1).float()
                logits = net.classifier(fake) if ce_weight else None
            loss = class_loss(real, fake, s.classes.to(device))
            if ce_weight:
                loss = loss + ce_weight * accuracy * class_ce_loss(logits, s.classes.to(device), num_classes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if it % log_every == 0 or it == iterations - 1 or time.time() - start > time_limit:
                s.losses.append((it, float(loss.detach())))
    out = {"seconds": time.time() - start, "iterations": done, "real_batch_per_class": per, "objective": objective,
           "networks": networks, "losses": {s.name: s.losses for s in sets}}
    if networks == "trained":
        out.update(ce_weight=ce_weight, pool_seconds=pool_seconds, pool_accuracies=sampler.accuracies)
    return out


def pixel_set(name: str, images: torch.Tensor, classes: torch.Tensor, lr: float = 0.5,
              device: torch.device | None = None) -> Parameterisation:
    """DM's own parameterisation: the pixels, SGD momentum 0.5."""
    params = images.clone().to(device or images.device).requires_grad_(True)
    return Parameterisation(name, params, lambda p: p, classes,
                            lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.5))

