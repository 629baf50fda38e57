"""First encoder E1 (cheap, runs on edge devices) and decoder D (server), docs/spec.md §1.

Built with diffusers' ResnetBlock2D as ConfigMixin models, so both
save/load with `save_pretrained`/`from_pretrained` offline. E1 is VAE-style (mean, log-variance);
the deterministic mean, multiplied by a `scaling_factor` fitted after training (as in Stable
Diffusion's 0.18215), is the latent that leaves a device: unit-variance latents suit the diffusion.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D


class ResBlock(ResnetBlock2D):
    """diffusers' ResnetBlock2D without a time embedding (usable inside nn.Sequential)."""

    def __init__(self, cin: int, cout: int, groups: int = 8):
        super().__init__(in_channels=cin, out_channels=cout, temb_channels=None, groups=groups, groups_out=groups)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, temb)


def _block(cin: int, cout: int) -> ResBlock:
    return ResBlock(cin, cout)


class FirstEncoder(ModelMixin, ConfigMixin):
    """Image (C, S, S) -> latent (latent_channels, S/2^k, S/2^k), k = len(channels).

    Cheap on purpose (edge devices): strided 4x4 convolutions down to the latent grid, one residual
    block there.
    """

    @register_to_config
    def __init__(self, in_channels: int = 1, latent_channels: int = 4, channels: tuple = (32, 64)):
        super().__init__()
        layers, cin = [], in_channels
        for cout in channels:
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.SiLU()]
            cin = cout
        self.body = nn.Sequential(*layers, _block(cin, cin))
        self.norm_out = nn.GroupNorm(8, cin)
        self.conv_out = nn.Conv2d(cin, 2 * latent_channels, 3, padding=1)
        self.register_buffer("scaling_factor", torch.ones(()))

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv_out(nn.functional.silu(self.norm_out(self.body(images))))
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The latent that leaves the device: scaled posterior mean."""
        return self.moments(images)[0] * self.scaling_factor


class Decoder(ModelMixin, ConfigMixin):
    """Latent -> image in [-1, 1] (server side): residual blocks on the latent grid, then
    transposed-convolution upsampling."""

    @register_to_config
    def __init__(self, out_channels: int = 1, latent_channels: int = 4, channels: tuple = (128, 64, 32)):
        super().__init__()
        self.conv_in = nn.Conv2d(latent_channels, channels[0], 3, padding=1)
        layers, cin = [_block(channels[0], channels[0]), _block(channels[0], channels[0])], channels[0]
        for cout in channels[1:]:
            layers += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.SiLU()]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)
        self.register_buffer("scaling_factor", torch.ones(()))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv_out(self.body(self.conv_in(latents / self.scaling_factor))))
