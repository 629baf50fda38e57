"""Distribution matching (DM; Zhao & Bilen, WACV 2023) for any parameterisation of a synthetic set.

Each iteration draws a freshly initialised ConvNet-3 (width 128, instance norm); for every class c the
mean embedding of a real batch (256 images) and of the synthetic images of class c, both under one
siamese DSA draw, are pulled together: L = sum_c || mean f(A(real_c)) - mean f(A(syn_c)) ||^2.

What is optimised is a `Parameterisation`:
- pixels (the DM baseline; benchmarks/dm.py): SGD, momentum 0.5, DM's image learning rate 1 in its
  normalised pixel units, which is (2 sigma)^2 = 0.5 in our [-1, 1] units (x = 2 sigma x_norm + c,
  sigma = 0.353 for Fashion-MNIST; the instance-normed ConvNet is near-invariant to the input scale);
- the chain's final latents through the frozen decoder, as GLaD (Cazenavette et al., CVPR 2023) and
  LD3M optimise a generator's latents (server/condense/refine.py).
Several sets (seeds, IPCs, variants) run in one loop, sharing each iteration's network and real
batch; each set follows DM's update exactly, and the seeds' sets are correlated through those draws.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from shared.augment import apply_dsa, draw_dsa
from shared.device import autocast
from shared.models.students import ConvNet
from shared.progress import progress


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


def match(sets: list[Parameterisation], real_images: torch.Tensor, real_labels: torch.Tensor, num_classes: int,
          iterations: int, device: torch.device, real_batch: int = 256, seed: int = 0, width: int = 128,
          desc: str = "distribution matching", log_every: int = 100, time_limit: float = float("inf")) -> dict:
    """Optimise every set in place for `iterations`, or until `time_limit` seconds have passed (the
    iterations run are returned); returns the time and each set's loss curve."""
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
    c_img, side = real_images.shape[1], real_images.shape[-1]
    net = ConvNet(c_img, num_classes, width, 3, side).to(device).requires_grad_(False)
    layers = [m for m in net.modules() if hasattr(m, "reset_parameters") and m is not net]
    done = 0
    for it in progress(range(iterations), desc=desc, unit="it"):
        if time.time() - start > time_limit:
            break
        done = it + 1
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        for layer in layers:                     # a fresh random network, initialised in place on the device
            layer.reset_parameters()
        idx = _real_batch(by_class, per, gen)
        draw = draw_dsa(num_classes * per, gen, torch.arange(num_classes).repeat_interleave(per))
        with torch.no_grad(), autocast(device, cpu_bf16=True):
            real = net.features(apply_dsa(real_images[idx].to(device), draw)).flatten(1).float()
        real_mean = real.view(num_classes, per, -1).mean(1)
        for s, opt, slot in zip(sets, opts, slots):
            images = s.render(s.params)
            with autocast(device, cpu_bf16=True):
                fake = net.features(apply_dsa(images, draw.subset(slot))).flatten(1).float()
            cls = s.classes.to(device)
            sums = torch.zeros(num_classes, fake.shape[1], device=device).index_add_(0, cls, fake)
            counts = torch.bincount(cls, minlength=num_classes).clamp_min(1)[:, None]
            present = torch.bincount(cls, minlength=num_classes) > 0
            loss = (real_mean - sums / counts)[present].pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if it % log_every == 0 or it == iterations - 1 or time.time() - start > time_limit:
                s.losses.append((it, float(loss.detach())))
    return {"seconds": time.time() - start, "iterations": done, "real_batch_per_class": per,
            "losses": {s.name: s.losses for s in sets}}


def pixel_set(name: str, images: torch.Tensor, classes: torch.Tensor, lr: float = 0.5,
              device: torch.device | None = None) -> Parameterisation:
    """DM's own parameterisation: the pixels, SGD momentum 0.5."""
    params = images.clone().to(device or images.device).requires_grad_(True)
    return Parameterisation(name, params, lambda p: p, classes,
                            lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.5))

