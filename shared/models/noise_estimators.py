"""The chain of T conditional noise estimators (docs/spec.md §1 claim 2, figures 3-4).

Each estimator is a diffusers UNet2DConditionModel: Q from the noisy latent z_t, K/V from the E2
tokens of the conditioning image (cross-attention). Layouts:
- `separate` (default, claim 2): T modules; module t only ever sees step t.
- `shared`: one module for every step, told the step by its timestep embedding.
Indices are 0-based diffusers timesteps: estimator t denoises z_{t+1} -> z_t in the SPEC's 1-based terms.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

LAYOUTS = ("separate", "shared")


def make_unet(latent_channels: int, sample_size: int, channels: tuple, cross_attention_dim: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=tuple(channels), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8)


class NoiseEstimators(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, T: int = 20, layout: str = "separate", latent_channels: int = 4, sample_size: int = 8,
                 channels: tuple = (32, 64), cross_attention_dim: int = 64):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown estimator layout '{layout}'; choose one of {LAYOUTS}")
        if T < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        n = T if layout == "separate" else 1
        self.estimators = nn.ModuleList(
            make_unet(latent_channels, sample_size, channels, cross_attention_dim) for _ in range(n))

    def estimator(self, t: int) -> UNet2DConditionModel:
        if not 0 <= t < self.config.T:
            raise IndexError(f"step {t} outside 0..{self.config.T - 1}")
        return self.estimators[t if self.config.layout == "separate" else 0]

    def forward(self, z_t: torch.Tensor, t: int, cond: torch.Tensor) -> torch.Tensor:
        """Predicted noise for all of `z_t` at step t (one step per call: one module per step)."""
        steps = torch.full((z_t.shape[0],), t, device=z_t.device, dtype=torch.long)
        return self.estimator(t)(z_t, steps, encoder_hidden_states=cond).sample


PREDICTIONS = ("epsilon", "v_prediction")


def make_scheduler(T: int, beta_schedule: str, sampler: str = "ddpm", clip_range: float | None = None,
                   prediction: str = "epsilon"):
    """DDPM for training/ancestral sampling, DDIM (eta 0) for deterministic sampling; T train steps.

    `prediction`: what the estimators output. 'epsilon' is the noise itself (docs/spec.md §1). **Reading:**
    'v_prediction' outputs the velocity v = sqrt(a_bar) eps - sqrt(1 - a_bar) z_0, an invertible
    re-parameterisation of the same noise estimate (eps = sqrt(a_bar) v + sqrt(1 - a_bar) z_t); it
    stays well conditioned at the highest noise levels, where a short chain sets each image's shape.

    `clip_range`: clip the predicted z_0 to [-r, r] while sampling. Needed because the cosine
    schedule's last step has a_bar ~ 1e-5, where z_0 = (z - sqrt(1 - a_bar) eps) / sqrt(a_bar) would
    amplify the estimator's error ~300x.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction '{prediction}'; choose one of {PREDICTIONS}")
    kwargs = dict(num_train_timesteps=T, beta_schedule=beta_schedule, prediction_type=prediction,
                  clip_sample=clip_range is not None, clip_sample_range=clip_range or 1.0)
    if sampler == "ddpm":
        sched = DDPMScheduler(**kwargs)
    elif sampler == "ddim":
        sched = DDIMScheduler(**kwargs, set_alpha_to_one=True)
    else:
        raise ValueError(f"unknown sampler '{sampler}'; choose ddpm or ddim")
    sched.set_timesteps(T)
    if list(sched.timesteps) != list(range(T - 1, -1, -1)):
        raise AssertionError(f"scheduler does not visit every step once: {sched.timesteps.tolist()}")
    return sched
