"""Privacy attacks an auditor can rerun: membership inference, latent inversion,
memorisation distances. Each returns plain numbers; `server/audit/runner.py` draws and reports them."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import stats

from shared.progress import progress


# ------------------------------------------------------------------ membership inference
@torch.no_grad()
def example_scores(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> np.ndarray:
    """LiRA's per-example statistic: the logit-scaled confidence on the true label, log(p / (1 - p))."""
    model.eval()
    out = []
    for lo in range(0, len(images), batch):
        logp = F.log_softmax(model(images[lo:lo + batch]).double(), 1)
        p_true = logp.gather(1, labels[lo:lo + batch, None]).squeeze(1)
        out.append((p_true - torch.log1p(-p_true.exp().clamp(max=1 - 1e-12))).numpy())
    return np.concatenate(out)


MODEL_ATTACKS = ("loss_threshold", "lira_offline", "lira_online")      # the result keys of attacks on a model


def roc(scores: np.ndarray, is_member: np.ndarray) -> dict:
    """ROC of 'higher score = member': AUC and TPR at 1 % and 0.1 % FPR, plus the curve for plots."""
    order = np.argsort(-scores, kind="stable")
    truth = is_member[order].astype(bool)
    tpr = np.concatenate([[0], np.cumsum(truth) / max(truth.sum(), 1)])
    fpr = np.concatenate([[0], np.cumsum(~truth) / max((~truth).sum(), 1)])
    auc = float(np.trapezoid(tpr, fpr))
    at = lambda f: float(tpr[np.searchsorted(fpr, f, side="right") - 1])
    return {"auc": auc, "tpr_at_1pct_fpr": at(0.01), "tpr_at_0.1pct_fpr": at(0.001),
            "fpr": fpr[:: max(1, len(fpr) // 400)].tolist(), "tpr": tpr[:: max(1, len(tpr) // 400)].tolist()}


def bootstrap_intervals(scores: np.ndarray, is_member: np.ndarray, resamples: int = 200, level: float = 0.95,
                        seed: int = 0) -> dict:
    """Percentile bootstrap intervals of AUC and TPR at 1 % / 0.1 % FPR, members and non-members resampled
    separately (their counts fixed)."""
    rng = np.random.default_rng(seed)
    members, others = np.flatnonzero(is_member == 1), np.flatnonzero(is_member == 0)
    keys = ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")
    draws = {k: [] for k in keys}
    for _ in range(resamples):
        idx = np.r_[rng.choice(members, len(members)), rng.choice(others, len(others))]
        r = roc(scores[idx], is_member[idx])
        for k in keys:
            draws[k].append(r[k])
    tail = 100 * (1 - level) / 2
    return {k: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] for k, v in draws.items()} | \
        {"level": level, "resamples": resamples}


def clopper_pearson_upper(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) upper confidence bound of a binomial rate with k successes in n trials."""
    k = np.asarray(k, dtype=float)
    return np.where(k >= n, 1.0, stats.beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1e-12)))


def empirical_epsilon(scores: np.ndarray, is_member: np.ndarray, delta: float, confidence: float = 0.95,
                      seed: int = 0) -> dict:
    """A lower bound on epsilon from the attack (Jagielski et al. 2020; Nasr et al. 2021).

    The attack is a test of 'member' against 'non-member'. (epsilon, delta)-DP bounds every test:
    FPR + e^eps FNR >= 1 - delta and FNR + e^eps FPR >= 1 - delta. The threshold that maximises the bound on
    one random half of the candidates is evaluated on the other half: one-sided Clopper-Pearson upper bounds on FPR and FNR
    (each at 1 - (1 - confidence) / 2, so both hold together at `confidence`) give
    eps_lb = max(log((1 - delta - FNR_hi) / FPR_hi), log((1 - delta - FPR_hi) / FNR_hi), 0).
    Each candidate is one trial of the game, as one-run audits count them (Steinke et al. 2023)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(scores))
    pick, hold = order[: len(order) // 2], order[len(order) // 2:]
    alpha = (1 - confidence) / 2

    def rates(idx, threshold):
        member = is_member[idx].astype(bool)
        guess = scores[idx] >= threshold
        return int((guess & ~member).sum()), int((~member).sum()), int((~guess & member).sum()), int(member.sum())

    def bound(fp, n_out, fn, n_in):
        fpr_hi, fnr_hi = clopper_pearson_upper(fp, n_out, alpha), clopper_pearson_upper(fn, n_in, alpha)
        with np.errstate(divide="ignore", invalid="ignore"):
            options = [np.log((1 - delta - fnr_hi) / fpr_hi), np.log((1 - delta - fpr_hi) / fnr_hi)]
        return max(0.0, *(float(v) for v in options if np.isfinite(v)))

    thresholds = np.unique(scores[pick])                  # the bound itself picks: extreme thresholds lose
    best = max(thresholds, key=lambda t: bound(*rates(pick, t))) if len(thresholds) else 0.0
    fp, n_out, fn, n_in = rates(hold, best)
    return {"epsilon_lower_bound": bound(fp, n_out, fn, n_in), "delta": delta, "confidence": confidence,
            "threshold": float(best), "held_out": {"fp": fp, "nonmembers": n_out, "fn": fn, "members": n_in}}


def attack_figures(scores: np.ndarray, is_member: np.ndarray, delta: float) -> dict:
    """ROC figures, their bootstrap intervals and the empirical epsilon lower bound of one attack."""
    return {**roc(scores, is_member), "ci": bootstrap_intervals(scores, is_member),
            "empirical_epsilon": empirical_epsilon(scores, is_member, delta)}


def loss_threshold_attack(target_scores: np.ndarray, is_member: np.ndarray) -> dict:
    """Yeom et al. 2018 baseline: lower loss (higher confidence) means member."""
    return roc(target_scores, is_member)


def lira_offline(target_scores: np.ndarray, shadow_out_scores: np.ndarray, is_member: np.ndarray) -> dict:
    """LiRA, offline variant (Carlini et al. 2022): per example, fit a Gaussian to its scores under
    shadow models that did NOT train on it; the test statistic is how far above that the target lies.
    `shadow_out_scores`: (num_shadows, N)."""
    mu, sd = shadow_out_scores.mean(0), shadow_out_scores.std(0) + 1e-6
    statistic = stats.norm.logcdf(target_scores, mu, sd)
    return {**roc(statistic, is_member), "scores": statistic}


def lira_online(target_scores: np.ndarray, shadow_scores: np.ndarray, shadow_in: np.ndarray,
                is_member: np.ndarray, min_each: int = 1) -> dict:
    """LiRA, online variant (Carlini et al. 2022): each shadow trained on a random half of the candidates;
    per example, one Gaussian to its scores under the shadows that trained on it (IN) and one under those
    that did not (OUT); the statistic is the log-likelihood ratio of the target's score. With few shadows
    the variances are pooled over all examples (the paper's fixed-variance variant). `shadow_scores` and
    `shadow_in`: (num_shadows, N); examples with fewer than `min_each` IN or OUT shadows score 0."""
    inside = shadow_in.astype(bool)
    n_in, n_out = inside.sum(0), (~inside).sum(0)
    mu_in = np.where(inside, shadow_scores, 0).sum(0) / np.maximum(n_in, 1)
    mu_out = np.where(~inside, shadow_scores, 0).sum(0) / np.maximum(n_out, 1)
    sd_in = np.sqrt(np.nanmean(np.where(inside, (shadow_scores - mu_in) ** 2, np.nan))) + 1e-6
    sd_out = np.sqrt(np.nanmean(np.where(~inside, (shadow_scores - mu_out) ** 2, np.nan))) + 1e-6
    statistic = stats.norm.logpdf(target_scores, mu_in, sd_in) - stats.norm.logpdf(target_scores, mu_out, sd_out)
    statistic = np.where((n_in >= min_each) & (n_out >= min_each), statistic, 0.0)
    return {**roc(statistic, is_member), "scores": statistic, "in_shadows_median": float(np.median(n_in))}


# ------------------------------------------------------------------ latent inversion
def train_inverter(first_encoder: nn.Module, decoder_factory, public_images: torch.Tensor, steps: int,
                   device: torch.device, seed: int = 0, noise_std: float = 0.0) -> nn.Module:
    """The attacker knows E1 and holds public images: it trains its own inverse E1(x) -> x.
    `noise_std` > 0 trains it on noised latents, as an attacker facing DP would."""
    torch.manual_seed(seed)
    inv = decoder_factory().to(device)
    opt = torch.optim.AdamW(inv.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in progress(range(steps), desc="inverter", unit="step"):
        x = public_images[torch.randint(0, len(public_images), (128,), generator=gen)].to(device)
        with torch.no_grad():
            z = first_encoder(x)
            z = z + noise_std * torch.randn(z.shape, generator=gen).to(device)
        loss = F.mse_loss(inv(z), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return inv.eval()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, for images in [-1, 1] (peak-to-peak 2)."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(4.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) on [0, 1]-scaled images with a Gaussian window (sigma 1.5)."""
    a, b = (a + 1) / 2, (b + 1) / 2
    coords = torch.arange(window, dtype=a.dtype) - window // 2
    g = torch.exp(-coords ** 2 / (2 * 1.5 ** 2))
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2).expand(a.shape[1], 1, window, window)
    blur = lambda x: F.conv2d(x, kernel, groups=a.shape[1])
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


# ------------------------------------------------------------------ memorisation
def nearest_distances(queries: torch.Tensor, reference: torch.Tensor, exclude_self: bool = False,
                      batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """L2 distance (pixel space, per-pixel RMS) from each query to its nearest reference image, and its index."""
    ref = reference.flatten(1)
    dists, idxs = [], []
    for lo in range(0, len(queries), batch):
        d = torch.cdist(queries[lo:lo + batch].flatten(1), ref)
        if exclude_self:
            d[torch.arange(d.shape[0]), torch.arange(lo, lo + d.shape[0])] = float("inf")
        best = d.min(1)
        dists.append(best.values / ref.shape[1] ** 0.5)
        idxs.append(best.indices)
    return torch.cat(dists).numpy(), torch.cat(idxs).numpy()


def nearest_synthetic_scores(candidates: torch.Tensor, released: torch.Tensor) -> np.ndarray:
    """A membership score against the released set itself, no model involved: minus the distance from each
    candidate to its nearest released image (a set that copies or blends its conditioning images puts its
    members closer than non-members; Chen et al., "GAN-Leaks", CCS 2020, the full black-box attack)."""
    return -nearest_distances(candidates, released)[0]
