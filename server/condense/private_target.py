"""Central DP for a trusted server: the refinement's real side released once through the Gaussian mechanism.

Threat model: the devices send clean latents to a server they trust (over the sealed channel); the consumers
of what the server ships (the synthetic set, the student) are not trusted. The guarantee must then sit on the
shipped artifacts, so every use of the private pool goes through one mechanism:

- R random ConvNet-3s, drawn once from a public seed (DM's embedding, Zhao & Bilen, WACV 2023), embed each
  decoded private latent; the concatenated embedding is clipped to L2 norm sqrt(C^2 - w^2) and extended by a
  constant coordinate w, so the record's vector has norm <= C;
- the server releases, for every class c, the sum of those vectors plus N(0, (sigma C)^2 I): the class's
  mean embedding and (through the coordinate w) its count, noised once. This is DP-MERF's release (Harder
  et al., AISTATS 2021: a noised mean embedding of the private data, computed once, then fitted by a
  generator) with DM's random networks as the features.

Sensitivity, replace-one (image, label) record: a same-label replacement moves one class sum by at most 2C;
a replacement that changes the label moves two class sums by at most C each (sqrt 2 C jointly). So
L2 sensitivity 2C, and the labels and class counts are inside the guarantee; the accounting is the one of
the device's Gaussian latent (shared.accounting, REPLACE_ONE, sensitivity 2C, noise std sigma C).

Everything else the server ships is post-processing of that release and of its public split: the chain
(trained on the public split), the conditioning latents (drawn from the public split), the guidance
teacher (trained on the public split), and the refinement, which fits the chain's latents so that the
decoded set's class-mean embeddings under the same R networks match the released means.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from client.privacy import clip_latents, secure_normal
from shared.device import autocast
from shared.models.students import ConvNet
from shared.progress import progress

CENTRAL_NEIGHBOURING = ("replace one (image, label) record of the pool; dataset size fixed (L2 sensitivity 2C of the "
                        "class sums; labels and class counts inside the guarantee)")
COUNT_SHARE = 0.5          # w = COUNT_SHARE * C: the count coordinate's share of the clip norm


def embedding_clip(clip_norm: float) -> float:
    """The norm each record's embedding is clipped to, so that with the count coordinate w its vector has norm C."""
    return clip_norm * math.sqrt(1 - COUNT_SHARE ** 2)


@dataclass(frozen=True)
class EmbeddingBank:
    """R random ConvNet-3 embeddings, drawn from a public seed (nothing private chooses them); sizes from
    shared.config.CentralDPConfig."""
    nets: int
    width: int
    seed: int

    def build(self, channels: int, side: int, device: torch.device) -> list[ConvNet]:
        out = []
        for r in range(self.nets):
            torch.manual_seed(self.seed * 1_000_003 + r)
            out.append(ConvNet(channels, 10, self.width, 3, side).to(device).eval().requires_grad_(False))
        return out


def embed(nets: list[ConvNet], images: torch.Tensor) -> torch.Tensor:
    """(n, R * d): each network's flattened features, scaled by 1/sqrt(R) so the vector's norm does not grow with R."""
    scale = 1.0 / math.sqrt(len(nets))
    with autocast(images.device, cpu_bf16=True):
        return torch.cat([net.features(images).flatten(1).float() * scale for net in nets], dim=1)


@dataclass
class PrivateMeans:
    """What the mechanism releases, turned into per-class mean embeddings (post-processing)."""
    means: torch.Tensor            # (K, D) noised class sums / noised counts
    counts: torch.Tensor           # (K,) noised counts
    clip_norm: float
    noise_multiplier: float
    seconds: float
    released: torch.Tensor         # what the mechanism outputs: [noised class sums (K x D), noised w x counts (K)]
    meta: dict = field(default_factory=dict)

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip_norm


def clip_norm_from_public(nets: list[ConvNet], public_images: torch.Tensor, device: torch.device,
                          quantile: float = 0.9, batch: int = 512) -> float:
    """C from the public split (no privacy cost): the `quantile` of its embedding norms, widened so that
    the count coordinate fits beside them."""
    with torch.no_grad():
        norms = torch.cat([embed(nets, public_images[i:i + batch].to(device)).norm(dim=1).cpu()
                           for i in range(0, len(public_images), batch)])
    return float(torch.quantile(norms, quantile)) / embedding_clip(1.0)


@dataclass
class ClassSums:
    """The clean statistic the mechanism noises: per class, the sum of the records' clipped vectors."""
    sums: torch.Tensor             # (K, D) float64
    counts: torch.Tensor           # (K,) float64
    clip_norm: float
    seconds: float


@torch.no_grad()
def class_sums(decoder, latents: torch.Tensor, labels: torch.Tensor, num_classes: int, nets: list[ConvNet],
               clip_norm: float, device: torch.device, batch: int = 512) -> ClassSums:
    """Each private latent decoded, embedded by the R networks, clipped to sqrt(C^2 - w^2), summed per class."""
    start = time.time()
    inner = embedding_clip(clip_norm)
    sums = None
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for i in progress(range(0, len(latents), batch), desc="private class sums", unit="batch"):
        with autocast(device, cpu_bf16=True):
            images = decoder(latents[i:i + batch].to(device)).clamp(-1, 1).float()
        v = clip_latents(embed(nets, images), inner).double().cpu()
        if sums is None:
            sums = torch.zeros(num_classes, v.shape[1], dtype=torch.float64)
        y = labels[i:i + batch]
        sums.index_add_(0, y, v)
        counts += torch.bincount(y, minlength=num_classes).double()
    return ClassSums(sums, counts, clip_norm, time.time() - start)


def release_class_means(stat: ClassSums, noise_multiplier: float) -> PrivateMeans:
    """The Gaussian mechanism on [class sums, w x counts] (module docstring), then the noised means
    (post-processing). noise_multiplier 0: no noise (the same statistic without a guarantee, for reference)."""
    start = time.time()
    w = COUNT_SHARE * stat.clip_norm
    sums, counted = stat.sums, stat.counts * w
    if noise_multiplier > 0:
        sums = sums + secure_normal(sums.shape) * (noise_multiplier * stat.clip_norm)
        counted = counted + secure_normal(counted.shape) * (noise_multiplier * stat.clip_norm)
    counts = (counted / w).clamp_min(1.0)
    return PrivateMeans((sums / counts[:, None]).float(), counts.float(), stat.clip_norm, noise_multiplier,
                        stat.seconds + time.time() - start, torch.cat([sums.flatten(), counted]),
                        {"records": int(stat.counts.sum()), "dimension": int(sums.shape[1]), "count_weight": w})


def refine_to_means(zs: list[torch.Tensor], classes: list[torch.Tensor], decoder, target: PrivateMeans,
                    nets: list[ConvNet], iterations: int, lr: float, device: torch.device) -> dict:
    """Adam on each set's latents: sum_c || mean clip(f(D(z_c))) - released mean_c ||^2, f the R networks'
    embedding clipped as the release clipped it. Returns {'latents', 'losses', 'seconds', 'iterations'}."""
    start = time.time()
    decoder = decoder.eval().requires_grad_(False)
    inner = embedding_clip(target.clip_norm)
    means = target.means.to(device)
    params = [z.detach().clone().to(device).requires_grad_(True) for z in zs]
    opts = [torch.optim.Adam([p], lr=lr) for p in params]
    losses = [[] for _ in params]
    for it in progress(range(iterations), desc="refine to private means", unit="it"):
        for p, cls, opt, curve in zip(params, classes, opts, losses):
            with autocast(device, cpu_bf16=True):
                images = decoder(p).clamp(-1, 1).float()
            v = clip_latents(embed(nets, images), inner)
            cls = cls.to(device)
            sums = torch.zeros(len(means), v.shape[1], device=device).index_add_(0, cls, v)
            n = torch.bincount(cls, minlength=len(means))
            loss = (means - sums / n.clamp_min(1)[:, None])[n > 0].pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if it % 25 == 0 or it == iterations - 1:
                curve.append((it, float(loss.detach())))
    decoder.requires_grad_(True)
    return {"latents": [p.detach().cpu() for p in params], "losses": losses, "seconds": time.time() - start,
            "iterations": iterations}
