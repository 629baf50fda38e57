"""Diffusion-denoised decoupled KD, "DDKD" (docs/spec.md §3).

The student's feature is treated as a noisy teacher feature. A linear autoencoder (1x1 conv encoder
that cuts channels, conv decoder) compresses teacher features, L_ae = ||D(E(F_t)) - F_t||^2, and
Z_t = E(F_t) is detached. A light diffusion model (two ResNet bottleneck blocks, timestep embedding)
learns L_diff = ||eps - Phi(z_t, t)||^2 on Z_t. A 1x1 conv projects the student feature to Z_s; a small
conv module predicts gamma, and denoising starts from gamma * Z_s + (1 - gamma) * eps and runs 5 DDIM
steps to Z_s_hat. L_DDKD = MSE(Z_s_hat, Z_t). Total = l1 L_diff + l2 L_ae + l3 L_DDKD (l1 = l2 = 1).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDIMScheduler
from torchvision.models.resnet import Bottleneck

from server.distill.registry import LOSSES, LossInputs


class LightDiffusion(nn.Module):
    def __init__(self, channels: int, train_steps: int = 1000):
        super().__init__()
        self.embed = nn.Embedding(train_steps, channels)
        self.blocks = nn.Sequential(Bottleneck(channels, channels // 4), Bottleneck(channels, channels // 4))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.blocks(z + self.embed(t)[:, :, None, None])


@LOSSES.register("ddkd")
class DDKD(nn.Module):
    """Diffusion-denoised KD (docs/spec.md §3): a light diffusion model denoises student features, 5 DDIM steps.

    Teacher features pass through an autoencoder; the student's projected features are denoised towards its
    latent with adaptive noise matching."""

    def __init__(self, num_classes: int, student_channels: int = 0, teacher_channels: int = 0,
                 latent_channels: int = 32, steps: int = 5, weights=(1.0, 1.0, 1.0), **_):
        super().__init__()
        if not student_channels or not teacher_channels:
            raise ValueError("ddkd needs student_channels and teacher_channels (given by `distill` after a dry run)")
        c = latent_channels
        self.encoder, self.decoder = nn.Conv2d(teacher_channels, c, 1), nn.Conv2d(c, teacher_channels, 3, padding=1)
        self.project = nn.Conv2d(student_channels, c, 1)
        self.gamma = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, 1, 1),
                                   nn.AdaptiveAvgPool2d(1), nn.Sigmoid())
        self.diffusion = LightDiffusion(c)
        self.sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
        self.sched.set_timesteps(steps)
        self.weights = weights

    def denoise(self, z_s: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma(z_s)
        z = gamma * z_s + (1 - gamma) * torch.randn_like(z_s)
        for t in self.sched.timesteps.tolist():
            eps = self.diffusion(z, torch.full((len(z),), t, device=z.device, dtype=torch.long))
            z = self.sched.step(eps, t, z, eta=0.0).prev_sample
        return z

    def forward(self, inp: LossInputs) -> torch.Tensor:
        fs, ft = inp.need_features("ddkd")
        ft = ft.detach()
        z_t_full = self.encoder(ft)
        l_ae = F.mse_loss(self.decoder(z_t_full), ft)
        z_t = z_t_full.detach()
        eps = torch.randn_like(z_t)
        t = torch.randint(0, 1000, (len(z_t),), device=z_t.device)
        l_diff = F.mse_loss(self.diffusion(self.sched.add_noise(z_t, eps, t), t), eps)
        z_s = self.project(F.adaptive_avg_pool2d(fs, ft.shape[-2:]))
        l_ddkd = F.mse_loss(self.denoise(z_s), z_t)
        w1, w2, w3 = self.weights
        return w1 * l_diff + w2 * l_ae + w3 * l_ddkd
