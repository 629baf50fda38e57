"""Distribution Matching (DM), Zhao & Bilen, WACV 2023, implemented from the paper.

Synthetic images (initialised from random real images of their class) are optimised so that, for a
freshly initialised random ConvNet each iteration, the mean embedding of each class's synthetic
images matches the mean embedding of a real batch of that class, both under the same differentiable
(siamese) augmentation draw, all classes in one batch: L = sum_c || mean f(A(x_real,c)) - mean f(A(s_c)) ||^2. SGD on the pixels
(lr 1, momentum 0.5), as in the paper.
"""
from __future__ import annotations

import time

import torch

from shared.augment import affine_theta, warp
from shared.device import autocast
from shared.models.students import ConvNet
from shared.progress import progress


def distribution_matching(images: torch.Tensor, labels: torch.Tensor, ipc: int, iterations: int,
                          device: torch.device, real_batch: int = 256, lr: float = 1.0, seed: int = 0) -> dict:
    """Returns {'images', 'labels' (hard), 'seconds', 'losses' (the objective per iteration)}."""
    start = time.time()
    gen = torch.Generator().manual_seed(seed)
    classes = labels.unique().tolist()
    by_class = {c: torch.nonzero(labels == c).flatten() for c in classes}
    init = torch.cat([by_class[c][torch.randperm(len(by_class[c]), generator=gen)[:ipc]] for c in classes])
    syn = images[init].clone().to(device).requires_grad_(True)
    syn_labels = labels[init].clone()
    opt = torch.optim.SGD([syn], lr=lr, momentum=0.5)
    k, per = len(classes), min(real_batch, *(len(v) for v in by_class.values()))
    if ipc > per:
        raise ValueError(f"DM needs a real batch of at least ipc={ipc} images per class; got {per}")
    # synthetic image j of class c shares the augmentation draw of real image j of that class (siamese)
    keep = (torch.arange(k)[:, None] * per + torch.arange(ipc)).flatten()
    losses = []
    for _ in progress(range(iterations), desc="DM", unit="it"):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        net = ConvNet(images.shape[1], k, 128, 3, images.shape[-1]).to(device).requires_grad_(False)
        idx = torch.cat([by_class[c][torch.randint(0, len(by_class[c]), (per,), generator=gen)] for c in classes])
        theta = affine_theta(k * per, 1.0, gen)
        with autocast(device, cpu_bf16=True):       # all classes in one pass: the net normalises each sample on its own
            with torch.no_grad():
                real = net.features(warp(images[idx].to(device), theta)).flatten(1).float()
            fake = net.features(warp(syn, theta[keep])).flatten(1).float()
        gap = real.view(k, per, -1).mean(1) - fake.view(k, ipc, -1).mean(1)
        loss = gap.pow(2).sum()
        losses.append(float(loss.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"images": syn.detach().clamp(-1, 1).cpu(), "labels": syn_labels, "seconds": time.time() - start,
            "losses": losses}
