"""What the server does with latents released under local DP before it condenses them (docs/privacy.md).

A released latent is a clipped latent (or the mean of k clipped same-label latents) plus Gaussian noise
of a std the ledger states. At useful epsilons that noise is many times the signal, so the server
replaces each released latent by its posterior mean under a Gaussian prior per released label
(a Wiener filter):

    z_hat = mu_c + S_c (S_c + s^2 I)^-1 (z_released - mu_c)

mu_c: the mean of the released latents of label c (unbiased: the noise has mean zero); S_c: the
covariance of clipped latents of class c on the server's public split, divided by k for group means;
s: the mechanism's noise std. Only released values and public data enter, so this is post-processing
and spends no privacy. Where the noise dominates, z_hat stays near the class mean; where it does not,
near the released value.
"""
from __future__ import annotations

import torch

from client.privacy import clip_latents


def class_covariances(latents: torch.Tensor, labels: torch.Tensor, num_classes: int, clip_norm: float
                      ) -> dict[int, torch.Tensor]:
    """Covariance (float64, d x d) of the clipped latents of each class present in `labels`."""
    flat = clip_latents(latents.double(), clip_norm).flatten(1)
    return {c: torch.cov(flat[labels == c].T) for c in range(num_classes) if int((labels == c).sum()) > 1}


def wiener_denoise(released: torch.Tensor, labels: torch.Tensor, prior: dict[int, torch.Tensor],
                   noise_std: float, group_size: int = 1) -> torch.Tensor:
    """Posterior means of `released` latents (float32, same shape); labels without a prior are kept as they are."""
    flat = released.double().flatten(1)
    out = flat.clone()
    eye = torch.eye(flat.shape[1], dtype=torch.float64)
    for c, cov in prior.items():
        rows = labels == c
        if not rows.any():
            continue
        signal = cov / group_size
        gain = torch.linalg.solve(signal + noise_std ** 2 * eye, signal)      # symmetric: (S + s^2 I)^-1 S
        mu = flat[rows].mean(dim=0)
        out[rows] = mu + (flat[rows] - mu) @ gain
    return out.float().view_as(released)
