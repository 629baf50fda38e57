"""Teacher guidance for the chain: the terms, and the direction they give (an extension beyond docs/spec.md §1;
see server/condense/chain.py for how the chain applies it).

Each term is an objective of a step's z_0 estimate, read through the server's teacher (E2 tokens, then
its head). The direction is the weighted sum of the terms' gradients with respect to z_0, each scaled to
unit RMS per image, so a term's weight is its share of the step whatever its units.
`CondenseConfig.guidance_terms` names them, like a loss spec: "label:1,representative:1". The teacher
runs in bf16 where the CPU has it (as in its training; shared/device.py), and always on CUDA: the
direction is normalised anyway, and fp32 would put 1,000 images at T=20 past 60 s on 2 cores.

- `label`: the teacher's log-probability of the image's soft label y = n_c / T.
- `representative`: minus the squared distance from the image's teacher tokens to the mean
  tokens of its own T conditioning latents, so the sample stands for its T real images as a group; the
  target is that group's mean, never one image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from shared.device import autocast
from shared.registry import Registry


@dataclass
class GuidanceInputs:
    features: torch.Tensor      # (B, F) the teacher's E2 tokens of the z_0 estimates, flattened
    logits: torch.Tensor        # (B, K) the teacher's head on them
    labels: torch.Tensor        # (B, K) each image's soft label
    targets: torch.Tensor       # (B, F) mean teacher tokens of each image's T conditioning latents


GUIDANCE_TERMS: Registry[Callable[[GuidanceInputs], torch.Tensor]] = Registry("guidance term")


@GUIDANCE_TERMS.register("label")
def label_term(inp: GuidanceInputs) -> torch.Tensor:
    return (inp.labels * F.log_softmax(inp.logits.float(), 1)).sum()


@GUIDANCE_TERMS.register("representative")
def representative_term(inp: GuidanceInputs) -> torch.Tensor:
    return -(inp.features.float() - inp.targets).pow(2).sum()


def parse_guidance_terms(spec: str) -> list[tuple[str, float]]:
    """'label:1,representative:1' -> names and weights (unknown names raise with the valid ones)."""
    terms = GUIDANCE_TERMS.parse(spec)
    if not all(math.isfinite(w) and w >= 0 for _, w in terms) or not any(w for _, w in terms):
        raise ValueError(f"guidance terms need finite weights >= 0, not all 0; got '{spec}' "
                         "(e.g. --guidance-terms label:1,representative:1)")
    return terms


def teacher_guidance(teacher, labels: torch.Tensor, cond_latents: torch.Tensor,
                     spec: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """z_0 estimates (B, c, s, s) -> the guidance direction (module docstring); `labels` (B, K) and
    `cond_latents` (B, T, c, s, s) are the batch's soft labels and conditioning latents."""
    terms = [(GUIDANCE_TERMS[n], w) for n, w in parse_guidance_terms(spec) if w]
    targets = torch.zeros(())
    if any(fn is representative_term for fn, _ in terms):
        with torch.no_grad(), autocast(cond_latents.device, cpu_bf16=True):
            targets = torch.stack([teacher.second_encoder(cond_latents[:, k]).flatten(1).float()
                                   for k in range(cond_latents.shape[1])]).mean(0)

    def direction(z0: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad(), autocast(z0.device, cpu_bf16=True):
            z0 = z0.detach().float().requires_grad_(True)
            features = teacher.second_encoder(z0)
            inp = GuidanceInputs(features.flatten(1), teacher.head(features), labels, targets)
            total = torch.zeros_like(z0)
            for i, (fn, w) in enumerate(terms):
                grad, = torch.autograd.grad(fn(inp), z0, retain_graph=i < len(terms) - 1)
                total += w * _unit_rms(grad)
        return total
    return direction


def _unit_rms(grad: torch.Tensor) -> torch.Tensor:
    rms = grad.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)
    return grad / rms.view(-1, *[1] * (grad.dim() - 1))
