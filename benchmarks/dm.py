"""Distribution Matching (DM), Zhao & Bilen, WACV 2023, implemented from the paper.

Synthetic images (initialised from random real images of their class) are optimised so that, for a
freshly initialised random ConvNet each iteration, the mean embedding of each class's synthetic
images matches the mean embedding of a real batch of that class, both under the same differentiable
(siamese) augmentation draw: L = sum_c || mean f(A(x_real,c)) - mean f(A(s_c)) ||^2. SGD on the pixels
(lr 1, momentum 0.5), as in the paper.
"""
from __future__ import annotations

import time

import torch

from shared.augment import random_affine
from shared.models.students import ConvNet
from shared.progress import progress


def distribution_matching(images: torch.Tensor, labels: torch.Tensor, ipc: int, iterations: int,
                          device: torch.device, real_batch: int = 256, lr: float = 1.0, seed: int = 0) -> dict:
    """Returns {'images', 'labels' (hard), 'seconds', 'peak_rss_mb'}."""
    start = time.time()
    gen = torch.Generator().manual_seed(seed)
    classes = labels.unique().tolist()
    by_class = {c: torch.nonzero(labels == c).flatten() for c in classes}
    init = torch.cat([by_class[c][torch.randperm(len(by_class[c]), generator=gen)[:ipc]] for c in classes])
    syn = images[init].clone().to(device).requires_grad_(True)
    syn_labels = labels[init].clone()
    opt = torch.optim.SGD([syn], lr=lr, momentum=0.5)
    for _ in progress(range(iterations), desc="DM", unit="it"):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        net = ConvNet(images.shape[1], len(classes), 128, 3, images.shape[-1]).to(device)
        net.requires_grad_(False)
        embed = lambda x: net.features(x).flatten(1)
        loss = torch.zeros((), device=device)
        for k, c in enumerate(classes):
            real = images[by_class[c][torch.randint(0, len(by_class[c]), (real_batch,), generator=gen)]].to(device)
            s = syn[k * ipc:(k + 1) * ipc]
            state = gen.get_state()
            real_aug = random_affine(real, 1.0, gen)
            gen_s = torch.Generator().set_state(state)        # siamese: the same draws for the synthetic batch
            syn_aug = random_affine(s.repeat(real_batch // ipc + 1, 1, 1, 1)[:real_batch], 1.0, gen_s)[:len(s)]
            loss = loss + (embed(real_aug).mean(0) - embed(syn_aug).mean(0)).pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"images": syn.detach().clamp(-1, 1).cpu(), "labels": syn_labels, "seconds": time.time() - start}
