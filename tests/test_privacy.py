"""Client-side Gaussian mechanism and its accounting (issue 4 acceptance)."""
import math

import pytest
import torch
from scipy import stats

from client.privacy import clip_latents, gaussian_mechanism
from shared.accounting import GaussianRelease, default_delta, noise_for_epsilon


def test_clipping_bound_holds_for_every_latent():
    z = torch.randn(1000, 4, 8, 8) * torch.logspace(-2, 2, 1000)[:, None, None, None]
    clipped = clip_latents(z, 3.0)
    assert (clipped.flatten(1).norm(dim=1) <= 3.0 + 1e-5).all()
    small = z.flatten(1).norm(dim=1) < 3.0
    assert torch.allclose(clipped[small], z[small]), "latents inside the ball are untouched"


def test_noise_scale_matches_sigma_times_clip():
    z = torch.zeros(2000, 4, 8, 8)
    out = gaussian_mechanism(z, clip_norm=2.0, noise_multiplier=1.5, generator=torch.Generator().manual_seed(0))
    noise = out.flatten()
    assert abs(noise.std().item() - 3.0) < 0.02 and abs(noise.mean().item()) < 0.01
    assert stats.kstest((noise[:20000] / 3.0).numpy(), "norm").pvalue > 1e-3


def test_epsilon_matches_an_independent_recomputation():
    """Analytic Gaussian mechanism (Balle & Wang 2018): delta(eps) for sensitivity 2C, std sigma C."""
    sigma, delta = 2.0, 1e-5
    eps = GaussianRelease(1.0, sigma, delta).epsilon()
    mu = 2.0 / sigma                                     # sensitivity / std

    def delta_of(e):
        return stats.norm.cdf(mu / 2 - e / mu) - math.exp(e) * stats.norm.cdf(-mu / 2 - e / mu)
    assert delta_of(eps) == pytest.approx(delta, rel=0.05)
    assert GaussianRelease(1.0, sigma, delta).epsilon("rdp") >= eps, "RDP is an upper bound"


@pytest.mark.parametrize("target", [1.0, 8.0])
def test_noise_solver_hits_target(target):
    delta = default_delta(54000)
    sigma = noise_for_epsilon(target, delta)
    assert GaussianRelease(1.0, sigma, delta).epsilon() <= target
    assert GaussianRelease(1.0, sigma * (1 - 2e-4), delta).epsilon() > target, "the smallest such sigma, to 1e-4"
    assert delta < 1 / 54000


@pytest.mark.parametrize("start_off_by", [0.998, 1.002])
def test_noise_solver_brackets_from_an_inexact_start(monkeypatch, start_off_by):
    """The analytic start only saves PLD evaluations: from a start 0.2 % off the bracket grows
    (either way) and the answer is the same smallest sigma; three releases compose."""
    import shared.accounting as accounting
    delta, exact = 1e-5, accounting.analytic_noise_multiplier(2.0, 1e-5, 3)
    monkeypatch.setattr(accounting, "analytic_noise_multiplier", lambda *a: exact * start_off_by)
    sigma = noise_for_epsilon(2.0, delta, releases=3)
    assert GaussianRelease(1.0, sigma, delta, 3).epsilon() <= 2.0 < GaussianRelease(1.0, sigma * (1 - 2e-4), delta, 3).epsilon()
    assert sigma == pytest.approx(exact, rel=2e-4)


def test_no_noise_means_no_guarantee():
    assert GaussianRelease(1.0, 0.0, 1e-5).epsilon() == math.inf
