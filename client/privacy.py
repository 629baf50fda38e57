"""The device's mechanisms (docs/privacy.md), applied before sealing, with randomness from the OS.

Latents: each is clipped to L2 norm <= C, then N(0, (sigma C)^2) noise is added per coordinate; or, with
group size k > 1, the clipped latents sharing a released label are cut into groups of k by an OS-random
permutation and each group's mean is released with N(0, (sigma C / k)^2) noise (records left over are
not released).
Labels: k-ary randomized response, or released as they are when the operator declares them public.
Labels are released first, so that groups are formed on what is released.

Every random draw comes from `os.urandom` (the kernel's CSPRNG), never from a seed: nothing the server
sends or sees (run id, node id, chunk index, partition) determines the noise, so the server cannot
regenerate and subtract it. Gaussians are drawn in float64 by the Box-Muller transform from 53-bit
uniforms and the sum is released in float16; that rounding is post-processing of the float64 sum.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from shared.accounting import rr_noise_parameter


def secure_uniform(n: int) -> np.ndarray:
    """n float64 uniforms in (0, 1], 53 random bits each, from os.urandom."""
    bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return (bits.astype(np.float64) + 1.0) / float(2 ** 53)


def secure_normal(shape) -> torch.Tensor:
    """Standard normal float64 draws of `shape` from os.urandom (Box-Muller)."""
    n = math.prod(shape)
    pairs = (n + 1) // 2
    u1, u2 = secure_uniform(pairs), secure_uniform(pairs)
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:n]
    return torch.from_numpy(z).view(*shape)


def clip_latents(latents: torch.Tensor, clip_norm: float) -> torch.Tensor:
    flat = latents.flatten(1)
    scale = (clip_norm / flat.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
    return (flat * scale[:, None]).view_as(latents)


def gaussian_mechanism(latents: torch.Tensor, clip_norm: float, noise_multiplier: float) -> torch.Tensor:
    """Clip to `clip_norm`, add OS-random Gaussian noise of std `noise_multiplier * clip_norm`
    (float64 sum, returned as float32). C <= 0: the latents as they are (no guarantee)."""
    if clip_norm <= 0:
        return latents
    clipped = clip_latents(latents.double(), clip_norm)
    if noise_multiplier <= 0:
        return clipped.float()
    return (clipped + secure_normal(clipped.shape) * (noise_multiplier * clip_norm)).float()


def secure_permutation(n: int) -> torch.Tensor:
    """A uniform permutation of range(n) from os.urandom (argsort of 53-bit uniforms)."""
    return torch.from_numpy(np.argsort(secure_uniform(n), kind="stable"))


def group_means(latents: torch.Tensor, labels: torch.Tensor, clip_norm: float, group_size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of `group_size` clipped latents of the same label (float64), with that label. Within each
    label the records are permuted with OS randomness and cut into consecutive groups; the last
    n_c mod k records of a label are not released. Which group a record joins depends on the labels
    and the permutation only, never on the latents, so one replaced record moves one mean by <= 2C/k."""
    clipped = clip_latents(latents.double(), clip_norm)
    means, out_labels = [], []
    for label in labels.unique(sorted=True).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[secure_permutation(len(members))]
        groups = len(members) // group_size
        if groups:
            chosen = clipped[members[:groups * group_size]]
            means.append(chosen.view(groups, group_size, *latents.shape[1:]).mean(dim=1))
            out_labels.append(torch.full((groups,), label, dtype=labels.dtype))
    if not means:
        return latents.new_zeros((0, *latents.shape[1:]), dtype=torch.float64), labels[:0]
    return torch.cat(means), torch.cat(out_labels)


def release_records(latents: torch.Tensor, labels: torch.Tensor, release) -> tuple[torch.Tensor, torch.Tensor]:
    """What a device sends for its records under `release` (shared.accounting.ImageRelease): labels through
    randomized response (when private and not public), then the latents (or group means) through the
    Gaussian mechanism. Float32 latents; without a guarantee, the records as they are."""
    if not release.private:
        return latents, labels
    if release.label_mechanism == "randomized_response":
        labels = randomized_response(labels, release.label_epsilon, release.num_classes)
    if release.group_size == 1:
        return gaussian_mechanism(latents, release.clip_norm, release.noise_multiplier), labels
    means, labels = group_means(latents, labels, release.clip_norm, release.group_size)
    return (means + secure_normal(means.shape) * release.noise_std).float(), labels


def randomized_response(labels: torch.Tensor, epsilon: float, num_classes: int) -> torch.Tensor:
    """k-ary randomized response: each label is kept with probability 1 - p, else replaced by a uniform
    draw over all k classes (itself included), p = rr_noise_parameter(epsilon, k); OS randomness."""
    p = rr_noise_parameter(epsilon, num_classes)
    n = len(labels)
    resample = torch.from_numpy(secure_uniform(n) <= p)
    uniform = torch.from_numpy(np.minimum((secure_uniform(n) * num_classes).astype(np.int64), num_classes - 1))
    return torch.where(resample, uniform, labels.long())
