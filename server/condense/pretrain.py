"""Pretraining: autoencoder (E1 + D) on the public split, then E2 + noise estimators on latents.

docs/spec.md §1 figures 3-4: z_t = sqrt(a_bar_t) z_0 + sqrt(1 - a_bar_t) eps; estimator t gets (z_t, E2(z_0))
of the SAME image and predicts eps. Checkpoints are cached by a hash of config + training data.
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from server.condense.committed import install
from shared.cache import building, cache_dir, fingerprint, to_jsonable
from shared.config import AutoencoderConfig, ChainConfig
from shared.device import autocast, cpu_bf16_key
from shared.models.first_encoder import Decoder, FirstEncoder
from shared.models.noise_estimators import NoiseEstimators, make_scheduler
from shared.models.second_encoder import SecondEncoder
from shared.progress import progress
from shared.workers import agreed, average_gradients, barrier, mean_over_workers, my_slice, world


def _batches(n: int, batch_size: int, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=gen)


def _save(path: Path, models: dict, meta: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    for name, model in models.items():
        model.save_pretrained(tmp / name)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    tmp.rename(path)  # atomic: a crash never leaves a half-written checkpoint


# ---------------------------------------------------------------- autoencoder
def _sample_latent(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The VAE reparameterisation: one draw from N(mean, exp(logvar)), so the decoder learns noisy latents."""
    return mean + torch.randn_like(mean) * (0.5 * logvar).exp()


def train_autoencoder(images: torch.Tensor, cfg: AutoencoderConfig, device: torch.device,
                      curves: dict | None = None) -> tuple[FirstEncoder, Decoder]:
    """E1 + D jointly, then the decoder stage; `curves` receives each stage's loss every 25 steps."""
    torch.manual_seed(cfg.seed)
    enc = FirstEncoder(images.shape[1], cfg.latent_channels, cfg.encoder_channels).to(device)
    dec = Decoder(images.shape[1], cfg.latent_channels, cfg.decoder_channels).to(device)
    opt = torch.optim.AdamW([*enc.parameters(), *dec.parameters()], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    bar = progress(_batches(len(images), cfg.batch_size, cfg.steps, cfg.seed), total=cfg.steps, desc="autoencoder", unit="step")
    curve = (curves if curves is not None else {}).setdefault("autoencoder_loss", [])
    for step, idx in enumerate(bar):
        x = images[idx].to(device)
        with autocast(device, cpu_bf16=True):
            mean, logvar = enc.moments(x)
            mean, logvar = mean.float(), logvar.float()
            z = _sample_latent(mean, logvar)
            recon = dec(z).float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = F.mse_loss(recon, x) + cfg.kl_weight * kl / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        _record(bar, curve, step, loss, "mse")
    with torch.no_grad():
        latents = torch.cat([enc.moments(images[i:i + 1024].to(device))[0] for i in range(0, len(images), 1024)])
        scale = 1.0 / latents.std()
    enc.scaling_factor.fill_(scale)
    dec.scaling_factor.fill_(scale)
    finetune_decoder(enc.eval(), dec, images, cfg, device, (curves if curves is not None else {}).setdefault("decoder_loss", []))
    return enc, dec.eval()


def _record(bar, curve: list, step: int, loss: torch.Tensor, name: str) -> None:
    """Every 25th step: the loss into the progress bar and the curve (one device sync per 25 steps)."""
    if step % 25 == 0:
        value = float(loss.detach())
        curve.append((step, value))
        bar.set_postfix({name: f"{value:.4f}"}, refresh=False)


def finetune_decoder(enc: FirstEncoder, dec: Decoder, images: torch.Tensor, cfg: AutoencoderConfig,
                     device: torch.device, curve: list | None = None) -> None:
    """Decoder-only training with E1 frozen, `cfg.decoder_finetune` steps per joint step (as Stable
    Diffusion's ft-MSE VAE decoder): the latents, hence the chain and teacher, stay as they are, and the
    decoder that turns every synthetic latent into pixels reconstructs better."""
    steps = round(cfg.decoder_finetune * cfg.steps)
    if steps < 1:
        return
    opt = torch.optim.AdamW(dec.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps, pct_start=0.1)
    bar = progress(_batches(len(images), cfg.batch_size, steps, cfg.seed + 1), total=steps, desc="decoder", unit="step")
    dec.train()
    curve = [] if curve is None else curve
    for step, idx in enumerate(bar):
        x = images[idx].to(device)
        with torch.no_grad(), autocast(device, cpu_bf16=True):
            mean, logvar = enc.moments(x)
        z = _sample_latent(mean.float(), logvar.float()) * enc.scaling_factor
        with autocast(device, cpu_bf16=True):
            loss = F.mse_loss(dec(z).float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        _record(bar, curve, step, loss, "mse")


def load_or_train_autoencoder(images: torch.Tensor, cfg: AutoencoderConfig, device: torch.device) -> tuple[FirstEncoder, Decoder, dict]:
    """Returns (E1, D, info) with info['seconds'] = 0 on a cache hit."""
    path = cache_dir("autoencoder", cfg, fingerprint(images), *cpu_bf16_key(device))
    start, trained, committed = time.time(), False, None
    with building(path):
        if not path.exists():
            committed = install("autoencoder", path, config=to_jsonable(cfg), public_fingerprint=fingerprint(images))
        if not path.exists():
            curves = {}
            enc, dec = train_autoencoder(images, cfg, device, curves)
            _save(path, {"first_encoder": enc, "decoder": dec}, {"config": to_jsonable(cfg), "images": len(images),
                                                                  "curves": curves})
            trained = True
    enc = FirstEncoder.from_pretrained(path / "first_encoder", low_cpu_mem_usage=False).to(device).eval()
    dec = Decoder.from_pretrained(path / "decoder", low_cpu_mem_usage=False).to(device).eval()
    return enc, dec, {"path": str(path), "seconds": time.time() - start, "trained": trained,
                      **({"committed": committed} if committed else {})}


# ---------------------------------------------------------------- chain
def _noise_loss(e2, estimators, sched, z0: torch.Tensor, t: int | torch.Tensor,
                eps: torch.Tensor | None = None) -> torch.Tensor:
    """Noise-prediction loss; `t` an int (one module) or per-sample steps (shared layout). The target
    is the noise, or its velocity re-parameterisation when the scheduler says so (make_scheduler)."""
    eps = torch.randn_like(z0) if eps is None else eps
    steps = t if torch.is_tensor(t) else torch.full((len(z0),), t, dtype=torch.long, device=z0.device)
    z_t = sched.add_noise(z0, eps, steps)
    target = sched.get_velocity(z0, eps, steps) if sched.config.prediction_type == "v_prediction" else eps
    with autocast(z0.device):
        cond = e2(z0)
        if torch.is_tensor(t):
            pred = estimators.estimators[0](z_t, steps, encoder_hidden_states=cond).sample
        else:
            pred = estimators(z_t, t, cond)
    return F.mse_loss(pred.float(), target)


def train_shared(latents: torch.Tensor, cfg: ChainConfig, device: torch.device,
                 curve: list | None = None) -> tuple[SecondEncoder, NoiseEstimators]:
    """E2 and the shared estimator. Under torchrun every worker draws the whole batch (indices, steps and noise,
    from the same seeds), trains on its slice and averages gradients: N workers follow one worker's run, up to
    the order of floating-point sums."""
    torch.manual_seed(cfg.seed)
    c, s = latents.shape[1], latents.shape[-1]
    e2 = SecondEncoder(c, cfg.second_encoder_channels, cfg.condition_tokens, cfg.cross_attention_dim).to(device)
    est = NoiseEstimators(cfg.T, "shared", c, s, cfg.unet_channels, cfg.cross_attention_dim).to(device)
    sched = make_scheduler(cfg.T, cfg.beta_schedule, "ddpm", prediction=cfg.prediction)
    opt = torch.optim.AdamW([*e2.parameters(), *est.parameters()], lr=cfg.lr)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=max(cfg.shared_steps, 1), pct_start=0.05)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    bar = progress(_batches(len(latents), cfg.batch_size, cfg.shared_steps, cfg.seed), total=cfg.shared_steps, desc="chain (shared)", unit="step")
    curve = [] if curve is None else curve
    params, mine = [*e2.parameters(), *est.parameters()], my_slice(cfg.batch_size)
    for step, idx in enumerate(bar):
        steps = torch.randint(0, cfg.T, (len(idx),), generator=gen).to(device)
        z0 = latents[idx].to(device)
        eps = torch.randn_like(z0)
        loss = _noise_loss(e2, est, sched, z0[mine], steps[mine], eps[mine])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params)
        opt.step()
        lr.step()
        _record(bar, curve, step, mean_over_workers(loss) if step % 25 == 0 else loss, "loss")
    return e2.eval(), est.eval()


def finetune_separate(latents: torch.Tensor, cfg: ChainConfig, e2: SecondEncoder, shared: NoiseEstimators,
                      device: torch.device) -> NoiseEstimators:
    """Claim 2's T modules: each starts from the shared estimator and is tuned on its own step only.

    E2 stays frozen so that every module conditions on the same token space. The noise draws are seeded
    here, so the modules depend on the config and the data alone: a run that loads the shared estimator
    from the cache (resumed, or with other module steps) builds what a cold run builds.
    """
    torch.manual_seed(cfg.seed + 2)
    est = NoiseEstimators(cfg.T, "separate", latents.shape[1], latents.shape[-1], cfg.unet_channels,
                          cfg.cross_attention_dim).to(device)
    sched = make_scheduler(cfg.T, cfg.beta_schedule, "ddpm", prediction=cfg.prediction)
    e2.requires_grad_(False)
    batches = _batches(len(latents), cfg.batch_size, cfg.T * cfg.module_steps, cfg.seed + 2)
    bar = progress(total=cfg.T * cfg.module_steps, desc="chain (separate)", unit="step")
    for t in range(cfg.T):
        module = est.estimators[t]
        module.load_state_dict(shared.estimators[0].state_dict())
        opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr * 0.3)
        for _ in range(cfg.module_steps):
            loss = _noise_loss(e2, est, sched, latents[next(batches)].to(device), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
    bar.close()
    e2.requires_grad_(True)
    return est.eval()


# Part of the separate entries' key: the per-module fine-tuning seeds its own noise (`finetune_separate`);
# entries built by code that did not are not what this code builds.
SEPARATE_RECIPE = "seeded-noise"


def load_or_train_chain(latents: torch.Tensor, cfg: ChainConfig, device: torch.device,
                        committed: dict | None = None) -> tuple[SecondEncoder, NoiseEstimators, dict]:
    """Trains (or loads) the shared estimator, then the separate modules when asked for. `committed`
    ({'e1_fingerprint': ...}, only for a pool that is the clean private split) lets a committed
    checkpoint of the same config stand in for training (server/condense/committed.py)."""
    start, key, used = time.time(), fingerprint(latents), None
    shared_cfg = replace(cfg, layout="shared", module_steps=0)
    shared_path = cache_dir("chain", shared_cfg, key)
    lead = world()[0] == 0                        # under torchrun: rank 0 holds the entry; every worker trains
    with building(shared_path) if lead else nullcontext():
        if lead and not shared_path.exists() and committed:
            used = install("chain", shared_path, config=to_jsonable(shared_cfg), **committed)
        if agreed(not shared_path.exists()):
            curve = []
            e2, est = train_shared(latents, shared_cfg, device, curve)
            if lead:
                _save(shared_path, {"second_encoder": e2, "noise_estimators": est},
                      {"config": to_jsonable(shared_cfg), "curves": {"chain_loss": curve}})
    barrier()
    path = shared_path
    if cfg.layout == "separate":
        path = cache_dir("chain", cfg, key, SEPARATE_RECIPE)
        if lead:                                  # T short fine-tunes, one after another: one worker
            with building(path):
                if not path.exists():
                    e2, est = load_chain(shared_path, device)
                    sep = finetune_separate(latents, cfg, e2, est, device)
                    _save(path, {"noise_estimators": sep}, {"config": to_jsonable(cfg), "second_encoder": shared_path.name})
        barrier()
    e2, est = load_chain(path, device)
    return e2, est, {"path": str(path), "seconds": time.time() - start, **({"committed": used} if used else {})}


def load_chain(path: Path, device: torch.device) -> tuple[SecondEncoder, NoiseEstimators]:
    """Load a chain checkpoint; a separate-layout one names the shared checkpoint holding its E2, a sibling
    entry of the same cache (by name, so a moved or copied cache still loads; older entries stored the
    absolute path, whose last part is that name)."""
    meta = json.loads((path / "meta.json").read_text())
    e2_root = path.parent / Path(meta["second_encoder"]).name if "second_encoder" in meta else path
    if not (e2_root / "second_encoder").is_dir():
        raise FileNotFoundError(f"chain checkpoint {path} needs the second encoder of {e2_root.name}, which is not "
                                f"in {path.parent}; copy that entry along, or delete {path} to retrain")
    e2 = SecondEncoder.from_pretrained(e2_root / "second_encoder", low_cpu_mem_usage=False).to(device).eval()
    est = NoiseEstimators.from_pretrained(path / "noise_estimators", low_cpu_mem_usage=False).to(device).eval()
    return e2, est
