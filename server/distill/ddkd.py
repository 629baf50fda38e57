"""Diffusion-denoised decoupled KD, "DDKD" (docs/spec.md §3), built as DiffKD (Huang et al., NeurIPS 2023) builds it.

The student's feature is treated as a noisy teacher feature. A linear autoencoder (1x1 conv encoder that
cuts channels, with batch norm so the latent has unit scale; 1x1 conv decoder) compresses teacher
features, L_ae = ||D(E(F_t)) - F_t||^2, and Z_t = E(F_t) is detached. A light diffusion model (two ResNet
bottleneck blocks, timestep embedding) learns L_diff = ||eps - Phi(z_t, t)||^2 on Z_t. A 1x1 conv
projects the student feature to Z_s. Adaptive noise matching: a small module predicts gamma in (0, 1)
and denoising starts from sqrt(gamma) Z_s + sqrt(1 - gamma) eps, a sample at the middle of the noise
schedule, and runs 5 DDIM steps to t = 0; a 1x1 conv gives Z_s_hat. L_DDKD = MSE(Z_s_hat, Z_t).
Total = l1 L_diff + l2 L_ae + l3 L_DDKD (l1 = l2 = l3 = 1); the logits' decoupled KD is the `dkd` term
of the same spec (`soft_ce:1,dkd:1,ddkd:1`).

**Readings:** starting at the schedule's middle (DiffKD's pipeline runs the last 5 of 10 DDIM steps), not
at t = 999: a DDIM step from t ~ 800 divides by sqrt(alpha_bar) ~ 0.02, which multiplied the gradient
reaching the student ~50-fold and wrecked it (measured: 23 % where the soft-label student reached 62 %).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDIMScheduler
from torchvision.models.resnet import Bottleneck

from server.distill.registry import LOSSES, LossInputs

TRAIN_STEPS = 1000


class LightDiffusion(nn.Module):
    """Noise predictor on (c, H, W) latents: timestep embedding, two bottleneck blocks, 1x1 conv and norm."""

    def __init__(self, channels: int, train_steps: int = TRAIN_STEPS):
        super().__init__()
        self.embed = nn.Embedding(train_steps, channels)
        self.blocks = nn.Sequential(Bottleneck(channels, channels // 4), Bottleneck(channels, channels // 4),
                                    nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.blocks(z + self.embed(t)[:, :, None, None])


class NoiseAdapter(nn.Module):
    """gamma in (0, 1) per sample: how much of the start of denoising is the student's own feature."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(Bottleneck(channels, channels // 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(channels, 2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Kept inside [1e-4, 1 - 1e-4]: a softmax that saturates (bf16 rounds it to exactly 0 or 1) would
        give sqrt an infinite derivative and the student NaN gradients (measured)."""
        return self.net(z).float().softmax(1)[:, 0].clamp(1e-4, 1 - 1e-4)


@LOSSES.register("ddkd")
class DDKD(nn.Module):
    """Diffusion-denoised KD (docs/spec.md §3, as DiffKD): student features denoised by a light diffusion model, 5 DDIM steps.

    Teacher features pass through an autoencoder; the student's projected features start half-way down
    the noise schedule with adaptive noise matching. Pair with `dkd` for the logits."""

    def __init__(self, num_classes: int, student_channels: int = 0, teacher_channels: int = 0,
                 latent_channels: int = 32, steps: int = 5, weights=(1.0, 1.0, 1.0), **_):
        super().__init__()
        if not student_channels or not teacher_channels:
            raise ValueError("ddkd needs student_channels and teacher_channels (given by `distill` after a dry run)")
        c = latent_channels
        self.encoder = nn.Sequential(nn.Conv2d(teacher_channels, c, 1), nn.BatchNorm2d(c))
        self.decoder = nn.Conv2d(c, teacher_channels, 1)
        self.project, self.refine = nn.Conv2d(student_channels, c, 1), nn.Conv2d(c, c, 1)
        self.adapter, self.diffusion = NoiseAdapter(c), LightDiffusion(c)
        self.sched = DDIMScheduler(num_train_timesteps=TRAIN_STEPS, beta_schedule="linear", clip_sample=False)
        self.sched.set_timesteps(2 * steps)
        self.timesteps = self.sched.timesteps[steps:].tolist()          # the schedule's second half
        self.weights = weights

    def start(self, z_s: torch.Tensor) -> torch.Tensor:
        gamma = self.adapter(z_s)[:, None, None, None]
        return gamma.sqrt() * z_s + (1 - gamma).sqrt() * torch.randn_like(z_s)

    def denoise(self, z_s: torch.Tensor) -> torch.Tensor:
        z = self.start(z_s)
        for t in self.timesteps:
            eps = self.diffusion(z, torch.full((len(z),), t, device=z.device, dtype=torch.long))
            z = self.sched.step(eps, t, z, eta=0.0).prev_sample
        return self.refine(z)

    def forward(self, inp: LossInputs) -> torch.Tensor:
        fs, ft = inp.need_features("ddkd")
        ft = ft.detach().float()
        z_t_full = self.encoder(ft)
        l_ae = F.mse_loss(self.decoder(z_t_full), ft)
        z_t = z_t_full.detach()
        eps = torch.randn_like(z_t)
        t = torch.randint(0, TRAIN_STEPS, (len(z_t),), device=z_t.device)
        l_diff = F.mse_loss(self.diffusion(self.sched.add_noise(z_t, eps, t), t), eps)
        z_s = self.project(F.adaptive_avg_pool2d(fs.float(), ft.shape[-2:]))
        l_ddkd = F.mse_loss(self.denoise(z_s), z_t)
        w1, w2, w3 = self.weights
        return w1 * l_diff + w2 * l_ae + w3 * l_ddkd
