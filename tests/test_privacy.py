"""The device's mechanisms and their accounting (docs/privacy.md)."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from client.privacy import clip_latents, gaussian_mechanism, randomized_response, secure_normal
from shared.accounting import ImageRelease, calibrate, default_delta, noise_for_epsilon, rr_noise_parameter


def test_clipping_bound_holds_for_every_latent():
    z = torch.randn(1000, 4, 8, 8) * torch.logspace(-2, 2, 1000)[:, None, None, None]
    clipped = clip_latents(z, 3.0)
    assert (clipped.flatten(1).norm(dim=1) <= 3.0 + 1e-5).all()
    small = z.flatten(1).norm(dim=1) < 3.0
    assert torch.allclose(clipped[small], z[small]), "latents inside the ball are untouched"


def test_noise_scale_matches_sigma_times_clip():
    """Unseeded OS noise: every bound is >= 5 standard errors (n = 128,000: SE of the mean 0.0084, of the std 0.006)."""
    out = gaussian_mechanism(torch.zeros(2000, 4, 8, 8), clip_norm=2.0, noise_multiplier=1.5)
    noise = out.flatten()
    assert abs(noise.std().item() - 3.0) < 0.03 and abs(noise.mean().item()) < 0.045
    assert stats.kstest((noise[:20000] / 3.0).numpy(), "norm").pvalue > 1e-6


def test_noise_is_never_repeated():
    """Two releases of the same latents draw independent noise (no seed anyone could replay)."""
    z = torch.randn(64, 4, 8, 8)
    a, b = gaussian_mechanism(z, 5.0, 1.0), gaussian_mechanism(z, 5.0, 1.0)
    corr = np.corrcoef((a - clip_latents(z, 5.0)).flatten(), (b - clip_latents(z, 5.0)).flatten())[0, 1]
    assert abs(corr) < 0.04, "independent draws (5 SE at n = 16,384); a repeated draw correlates at 1.0"
    assert abs(float(secure_normal((100_000,)).std()) - 1.0) < 0.012


def test_randomized_response_keeps_each_label_with_the_right_probability():
    k, eps = 10, 2.0
    p = rr_noise_parameter(eps, k)
    labels = torch.arange(k).repeat(20_000)
    out = randomized_response(labels, eps, k)
    keep = float((out == labels).float().mean())
    assert keep == pytest.approx(1 - p + p / k, abs=0.006)                # 5 SE at n = 200,000
    # each wrong label equally likely, and the likelihood ratio of the kept label is e^eps
    wrong = torch.bincount((out - labels) % k, minlength=k)[1:].float()
    assert float(wrong.std() / wrong.mean()) < 0.05
    assert math.log((1 - p + p / k) / (p / k)) == pytest.approx(eps)


def _delta_of(eps, sigma, label_eps=None, k=10):
    """Exact privacy profile of the pair (Gaussian latent at sensitivity 2C, std sigma C; k-ary RR label),
    independent of dp-accounting: the privacy loss is the sum of the Gaussian's N(mu^2/2, mu^2) and the
    RR's {+e, 0, -e}; delta(eps) = E[(1 - exp(eps - L))_+], in closed form per RR value."""
    mu = 2.0 / sigma
    if label_eps is None:
        rr = [(0.0, 1.0)]
    else:
        p = rr_noise_parameter(label_eps, k)
        rr = [(label_eps, 1 - p + p / k), (-label_eps, p / k), (0.0, 1 - (1 - p + p / k) - p / k)]
    total = 0.0
    for r, q in rr:
        e = eps - r
        total += q * (stats.norm.cdf(mu / 2 - e / mu) - math.exp(e) * stats.norm.cdf(-mu / 2 - e / mu))
    return total


@pytest.mark.parametrize("sigma,label_eps", [(2.0, None), (1.0, 2.0), (3.0, 0.5)])
def test_epsilon_of_the_pair_matches_an_independent_recomputation(sigma, label_eps):
    delta = 1e-5
    release = ImageRelease(1.0, sigma, delta, "randomized_response" if label_eps else "public", label_eps)
    eps = release.epsilon()
    assert _delta_of(eps, sigma, label_eps) <= delta * 1.01, "PLD is a valid (upper) bound"
    assert _delta_of(eps * 0.97, sigma, label_eps) > delta, "and a tight one"
    assert release.epsilon("rdp") >= eps * 0.999, "RDP is the looser bound"


def test_labels_cost_privacy():
    public = ImageRelease(1.0, 2.0, 1e-5, "public")
    private = ImageRelease(1.0, 2.0, 1e-5, "randomized_response", 1.0)
    assert private.epsilon() > public.epsilon() + 0.5
    assert "SAME LABEL" in public.neighbouring


@pytest.mark.parametrize("target,mechanism", [(1.0, "randomized_response"), (8.0, "randomized_response"),
                                              (8.0, "public")])
def test_calibration_hits_the_target(target, mechanism):
    delta = default_delta(54000)
    release = calibrate(target, delta, label_mechanism=mechanism, clip_norm=3.0)
    assert release.epsilon() <= target
    looser = ImageRelease(3.0, release.noise_multiplier * (1 - 2e-4), delta, mechanism, release.label_epsilon)
    assert looser.epsilon() > target, "the smallest such sigma, to 1e-4"
    if mechanism == "randomized_response":
        assert release.label_epsilon == pytest.approx(0.25 * target)
    assert delta < 1 / 54000


def test_noise_solver_composes_repeated_releases():
    sigma = noise_for_epsilon(2.0, 1e-5, releases=3)
    assert ImageRelease(1.0, sigma, 1e-5, "public", releases=3).epsilon() <= 2.0
    assert ImageRelease(1.0, sigma, 1e-5, "public", releases=3).epsilon() > ImageRelease(1.0, sigma, 1e-5, "public").epsilon()


def test_no_noise_means_no_guarantee():
    assert ImageRelease(1.0, 0.0, 1e-5, "public").epsilon() == math.inf
    with pytest.raises(ValueError, match="label_epsilon"):
        ImageRelease(1.0, 1.0, 1e-5, "randomized_response", None)


def test_one_replaced_record_moves_one_group_mean_by_at_most_2c_over_k(monkeypatch):
    """Group membership depends on the labels and the permutation only: replacing one record's latent (the
    same permutation drawn) changes exactly one released mean, by at most 2C/k."""
    import client.privacy as privacy
    fixed = torch.randperm(4000, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(privacy, "secure_permutation", lambda n: fixed[fixed < n])
    k, clip = 8, 2.0                                      # 40 records per label: five groups, none held back
    z, y = torch.randn(400, 4, 8, 8) * 3, torch.arange(400) % 10
    before, lb = privacy.group_means(z, y, clip, k)
    z2 = z.clone()
    z2[123] = -50.0                                      # the worst replacement: opposite direction, far past C
    after, la = privacy.group_means(z2, y, clip, k)
    assert torch.equal(lb, la) and len(lb) == 10 * (40 // k)
    moved = (after - before).flatten(1).norm(dim=1)
    assert int((moved > 0).sum()) == 1 and float(moved.max()) <= 2 * clip / k + 1e-9


def test_group_size_keeps_the_epsilon_and_divides_the_noise():
    per_record = calibrate(3.0, 1e-5, clip_norm=5.0)
    grouped = calibrate(3.0, 1e-5, clip_norm=5.0, group_size=32)
    assert grouped.noise_multiplier == pytest.approx(per_record.noise_multiplier)
    assert grouped.noise_std == pytest.approx(per_record.noise_std / 32)
    with pytest.raises(ValueError, match="group_size"):
        ImageRelease(1.0, 1.0, 1e-5, "public", group_size=0)


def test_the_posterior_mean_filter_brings_noised_latents_closer_to_the_clean_ones():
    from server.condense.denoise import class_covariances, wiener_denoise
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(256, 8, generator=gen)                       # low-rank classes, as latents are
    centres = torch.randn(10, 256, generator=gen) * 0.5

    def draw(n):
        y = torch.arange(n) % 10
        return (centres[y] + torch.randn(n, 8, generator=gen) @ basis.T * 0.3).view(n, 4, 8, 8), y
    public, py = draw(2000)
    clean, y = draw(3000)
    prior = class_covariances(public, py, 10, clip_norm=1e9)
    for noise in (0.3, 3.0):
        noised = clean + torch.randn(clean.shape, generator=gen) * noise
        filtered = wiener_denoise(noised, y, prior, noise)
        err = lambda a: float((a - clean).pow(2).mean())
        assert err(filtered) < 0.5 * err(noised), f"noise {noise}: the filter does not reduce the error"
