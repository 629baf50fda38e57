"""Condensation: T real latents -> one synthetic image through the estimator chain (docs/spec.md §1 claims 1-7).

Per synthetic image: E1 encodes a noise image -> z_T; estimator k (k = 1..T, highest noise first)
denoises z, conditioned on E2 of the k-th selected real latent; D decodes the last latent. The label
is y_c = n_c / T. Only the reverse chain runs: no unrolled optimisation, no second-order gradients;
with `guidance` 0 (`--guidance 0`), no gradients at all, as docs/spec.md §1 describes the patent's chain.

**Reading (docs/spec.md §1, claim 2 / 'the noise image may be random or a preset image with noise added'):**
E1's output for a noise image is not distributed like the chain's training inputs, so z_T is the
forward-noised E1 latent of the noise image: z_T = sqrt(a_bar_T) E1(x_noise) + sqrt(1 - a_bar_T) eps.
`noise_init='random'`: x_noise is Gaussian pixel noise; `'preset'`: x_noise is D(mean of the image's
conditioning latents), i.e. a preset image with noise added. Under the default cosine schedule
a_bar_T is tiny, so the start is almost pure noise either way.

**Extension beyond docs/spec.md §1 (guidance; the default):** `cfg.guidance` > 0 adds
guidance from the server's teacher (E1 -> E2 -> head, trained on the same pooled latents). After each
estimator's step, the step's z_0 estimate moves `guidance` (RMS, latent units) along the direction of
`cfg.guidance_terms` (server/condense/guidance.py): up the teacher's log-probability of the image's soft label y,
and towards the teacher's mean tokens of the image's own T conditioning latents. z_{t-1} moves with it
by z_0's coefficient in the sampler's update; `cfg.guidance_steps` N > 0 guides only the last N steps
(a chain of N steps or fewer is guided throughout; defaults in shared/config.py). This
departs from the patent's gradient-free chain: each step also takes first-order gradients through the
small teacher (no unrolling). Claims 1-7 are otherwise unchanged: every step is still conditioned on its
own real latent, and the label is still n_c / T. The teacher is trained on the pooled latents, so
client-side DP is unchanged (post-processing).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from server.condense.batches import BatchStore, batch_generator
from shared.workers import barrier, world
from server.condense.guidance import parse_guidance_terms, teacher_guidance
from server.condense.selection import plan_and_select, soft_labels
from shared.cache import to_jsonable
from shared.config import ChainConfig, CondenseConfig
from shared.models.first_encoder import Decoder, FirstEncoder
from shared.models.noise_estimators import NoiseEstimators, make_scheduler
from shared.models.second_encoder import SecondEncoder
from shared.progress import progress


@dataclass
class SyntheticSet:
    images: torch.Tensor        # (M, C, S, S) in [-1, 1]
    labels: torch.Tensor        # (M, K) soft labels, rows sum to 1
    latents: torch.Tensor       # (M, c, s, s) final latents before decoding
    conditioning: torch.Tensor  # (M, T) real latent ids, column k conditions estimator k+1
    meta: dict

    def __len__(self) -> int:
        return len(self.labels)

    def save(self, out: Path, class_names: list[str] | None = None) -> None:
        out.mkdir(parents=True, exist_ok=True)
        save_file({"images": self.images.contiguous(), "labels": self.labels.contiguous(),
                   "latents": self.latents.contiguous(), "conditioning": self.conditioning.contiguous()},
                  str(out / "synthetic.safetensors"))
        cond = self.conditioning.view(len(self), -1)          # a formed image lists its tiles' latents in turn
        manifest = {**self.meta, "images": [
            {"index": j, "label": [round(float(p), 6) for p in self.labels[j]],
             "conditioning_ids": cond[j].tolist()} for j in range(len(self))]}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
        save_grid(self.images, self.labels.argmax(1), out / "grid.png", class_names)

    @classmethod
    def load(cls, out: Path) -> "SyntheticSet":
        out = Path(out)
        if not (out / "synthetic.safetensors").exists():
            raise FileNotFoundError(f"{out} holds no synthetic.safetensors; run `fedcondense condense --out {out}` first")
        t = load_file(str(out / "synthetic.safetensors"))
        meta = {k: v for k, v in json.loads((out / "manifest.json").read_text()).items() if k != "images"}
        return cls(t["images"], t["labels"], t["latents"], t["conditioning"], meta)


def save_grid(images: torch.Tensor, classes: torch.Tensor, path: Path, class_names=None, per_class: int = 10) -> None:
    """A PNG grid: one row per class, up to `per_class` images each."""
    import torchvision
    rows = []
    for c in torch.unique(classes):
        pick = images[classes == c][:per_class]
        pad = torch.full((per_class - len(pick), *images.shape[1:]), -1.0)
        rows.append(torch.cat([pick, pad]))
    grid = torchvision.utils.make_grid(torch.cat(rows) * 0.5 + 0.5, nrow=per_class, padding=2, pad_value=1.0)
    torchvision.utils.save_image(grid, str(path))


@torch.no_grad()
def run_chain(cond_latents: torch.Tensor, first_encoder: FirstEncoder, second_encoder: SecondEncoder,
              estimators: NoiseEstimators, decoder: Decoder, chain_cfg: ChainConfig, cfg: CondenseConfig,
              generator: torch.Generator, guide: Optional[Callable] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cond_latents (B, T, c, s, s) -> (images (B, C, S, S), final latents (B, c, s, s)).

    `guide`: z_0 estimate -> direction (server/condense/guidance.py: `teacher_guidance`), applied with weight `cfg.guidance`."""
    device = cond_latents.device
    B, T = cond_latents.shape[:2]
    sched = make_scheduler(T, chain_cfg.beta_schedule, cfg.sampler, cfg.clip_latent, chain_cfg.prediction)
    if cfg.noise_init == "random":
        factor = 2 ** len(first_encoder.config.channels)
        shape = (B, decoder.config.out_channels, *(factor * s for s in cond_latents.shape[-2:]))
        x_noise = torch.randn(shape, generator=generator).to(device)
    elif cfg.noise_init == "preset":
        x_noise = decoder(cond_latents.mean(1))
    else:
        raise ValueError(f"unknown noise_init '{cfg.noise_init}'; choose random or preset")
    a_T = sched.alphas_cumprod[T - 1].to(device)
    eps = torch.randn(cond_latents[:, 0].shape, generator=generator).to(device)
    z = a_T.sqrt() * first_encoder(x_noise).reshape(eps.shape) + (1 - a_T).sqrt() * eps
    for k, t in enumerate(sched.timesteps.tolist()):            # k-th estimator applied <-> step t = T-1-k
        cond = second_encoder(cond_latents[:, k])
        pred = estimators(z, t, cond)                            # the noise (or its velocity form)
        step = sched.step(pred, t, z, generator=generator) if cfg.sampler == "ddpm" else sched.step(pred, t, z, eta=0.0)
        z = step.prev_sample
        if guide is not None and cfg.guidance and k >= T - (cfg.guidance_steps or T):
            z = z + cfg.guidance * _z0_coefficient(sched, t, cfg.sampler) * guide(step.pred_original_sample)
    return decoder(z).clamp(-1, 1), z


def _z0_coefficient(sched, t: int, sampler: str) -> float:
    """How much z_{t-1} moves per unit move of the z_0 estimate: sqrt(a_bar_{t-1}) for DDIM, the
    posterior mean's sqrt(a_bar_{t-1}) beta_t / (1 - a_bar_t) for DDPM (a_bar_{-1} = 1)."""
    a_t = float(sched.alphas_cumprod[t])
    a_prev = float(sched.alphas_cumprod[t - 1]) if t > 0 else 1.0
    if sampler == "ddim":
        return a_prev ** 0.5
    return a_prev ** 0.5 * (1 - a_t / a_prev) / (1 - a_t)


def condense(latents: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, num_classes: int,
             models: dict, chain_cfg: ChainConfig, cfg: CondenseConfig, device: torch.device,
             work: Optional[Path] = None) -> SyntheticSet:
    """Plan, select, run the chain batch by batch, label; then, where `cfg` asks, refine the chain's latents
    (server/condense/refine.py) and form factor^2 chain images into each stored image
    (server/condense/formation.py). Deterministic for `cfg.seed`. `work`: a folder that keeps finished
    batches, so that a killed run resumes, and that workers under torch.distributed share
    (server/condense/batches.py); a rank other than 0 returns the chain's set unrefined."""
    start = time.time()
    if cfg.formation < 1 or (cfg.formation > 1 and cfg.ipc is None):
        raise ValueError(f"formation must be >= 1, and needs --ipc (not --ratio or --max-coverage); got {cfg.formation}")
    syn = run_chains(latents, labels, ids, num_classes, models, chain_cfg,
                     replace(cfg, ipc=cfg.ipc * cfg.formation ** 2) if cfg.ipc else cfg, device, work)
    if world()[0] != 0:
        return syn
    private = models.get("private_target")
    if private is not None:             # central DP: fitted to the pool's one release, never to the pool
        syn = refined_to_private_means([syn], models["decoder"], private["means"], private["nets"], cfg, device,
                                       private["iterations"])[0]
    elif cfg.refine_iterations:
        syn = refined(syn, latents, labels, num_classes, models["decoder"], cfg, device)
    syn = formed(syn, cfg.formation)
    syn.meta.update(config=to_jsonable(cfg), seconds=time.time() - start)
    return syn


def refined(syn: SyntheticSet | list[SyntheticSet], latents, labels, num_classes: int, decoder, cfg: CondenseConfig,
            device, time_limit: float = float("inf")):
    """Chain sets (one, or several refined in one loop) with their latents refined (server/condense/refine.py)."""
    from server.condense.refine import refine_latents
    many = isinstance(syn, list)
    sets = syn if many else [syn]
    out = refine_latents([s.latents for s in sets], [s.labels.argmax(1) for s in sets], decoder, latents, labels,
                         num_classes, cfg.refine_iterations, cfg.refine_lr, device, cfg.formation,
                         cfg.refine_real_per_class, cfg.refine_real_batch, seed=cfg.seed, time_limit=time_limit,
                         objective=cfg.refine_objective, networks=cfg.refine_networks,
                         ce_weight=cfg.refine_ce_weight, pool_steps=cfg.refine_pool_steps)
    from server.condense.embedders import NETWORK_FIELDS
    networks = {k: out[k] for k in NETWORK_FIELDS if k in out}
    done = with_refined_latents(sets, out, decoder, cfg, device, sets_in_one_loop=len(sets),
                                objective=cfg.refine_objective, **networks)
    return done if many else done[0]


def refined_to_private_means(sets: list[SyntheticSet], decoder, target, nets, cfg: CondenseConfig, device,
                             iterations: int | None = None) -> list[SyntheticSet]:
    """Chain sets with their latents fitted to a central-DP release of the pool's class-mean embeddings
    (server/condense/private_target.py) instead of to the pool itself."""
    from server.condense.private_target import refine_to_means
    out = refine_to_means([s.latents for s in sets], [s.labels.argmax(1) for s in sets], decoder, target, nets,
                          iterations or cfg.refine_iterations, cfg.refine_lr, device)
    return with_refined_latents(sets, out, decoder, cfg, device, target="central-DP class-mean embeddings")


@torch.no_grad()
def decode_latents(decoder, latents: torch.Tensor, device, batch: int = 256) -> torch.Tensor:
    """Images D(z) in [-1, 1] on the CPU, decoded `batch` latents at a time on `device`."""
    return torch.cat([decoder(latents[i:i + batch].to(device)).clamp(-1, 1).float().cpu()
                      for i in range(0, len(latents), batch)])


def with_refined_latents(sets: list[SyntheticSet], out: dict, decoder, cfg: CondenseConfig, device, **note
                         ) -> list[SyntheticSet]:
    """Each set with its refined latents (`out['latents']`) decoded, and the refinement recorded in its meta."""
    done = []
    for s, z, losses in zip(sets, out["latents"], out["losses"]):
        images = decode_latents(decoder, z, device, cfg.batch_size)
        meta = {**s.meta, "refine": {**note, "iterations": out["iterations"], "lr": cfg.refine_lr,
                                     "seconds": out["seconds"], "losses": losses}}
        done.append(SyntheticSet(images, s.labels, z, s.conditioning, meta))
    return done


def formed(syn: SyntheticSet, factor: int) -> SyntheticSet:
    """Tile groups of factor^2 same-class chain images into stored images; their label is the tiles' mean.
    Latents and conditioning stay per tile (factor^2 rows per stored image)."""
    if factor == 1:
        return syn
    from server.condense.formation import form
    order = torch.argsort(syn.labels.argmax(1), stable=True)          # tiles of one stored image share a class
    labels = syn.labels[order].view(-1, factor ** 2, syn.labels.shape[1]).mean(1)
    return SyntheticSet(form(syn.images[order], factor), labels, syn.latents[order], syn.conditioning[order],
                        {**syn.meta, "formation": factor, "synthetic_images": len(labels)})


def run_chains(latents: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, num_classes: int,
               models: dict, chain_cfg: ChainConfig, cfg: CondenseConfig, device: torch.device,
               work: Optional[Path] = None) -> SyntheticSet:
    """One chain image per planned group of T real latents (claims 1-7); batch b runs on worker b % N
    and is kept in `work` when given (server/condense/batches.py)."""
    start = time.time()
    T = chain_cfg.T
    teacher = _guidance_teacher(models, cfg, T)
    selected = plan_and_select(labels.numpy(), cfg, T, cfg.seed, latents=latents.float().numpy())
    y = torch.from_numpy(soft_labels(labels.numpy(), selected, num_classes))
    rank, workers = world()
    if workers > 1 and work is None:
        raise ValueError("a condensation over several workers needs a work folder they share (--out)")
    store = None if work is None else BatchStore(work, batch_key(latents, selected, y, models, teacher, chain_cfg, cfg))
    starts = list(range(0, len(selected), cfg.batch_size))
    done = {}
    for b in progress([b for b in range(len(starts)) if b % workers == rank], desc="condense", unit="batch"):
        if store is not None and store.has(b):
            continue
        lo = starts[b]
        cond = latents[torch.from_numpy(selected[lo:lo + cfg.batch_size])].to(device)
        guide = None if teacher is None else teacher_guidance(
            teacher, y[lo:lo + cfg.batch_size].float().to(device), cond, cfg.guidance_terms)
        x, z = run_chain(cond, models["first_encoder"], models["second_encoder"], models["noise_estimators"],
                         models["decoder"], chain_cfg, cfg, batch_generator(cfg.seed, b), guide)
        done[b] = (x.float().cpu(), z.float().cpu())
        if store is not None:
            store.save(b, *done[b])
    barrier()
    parts = [done[b] if b in done else store.load(b) for b in range(len(starts))]
    uses = np.bincount(selected.ravel(), minlength=len(labels))
    meta = {"config": to_jsonable(cfg), "chain": to_jsonable(chain_cfg), "T": T, "num_classes": num_classes,
            "synthetic_images": len(selected), "real_latents": len(labels),
            "real_latents_used": int((uses > 0).sum()), "reuse_count": int((uses > 1).sum()),
            "batches_resumed": len(starts) - len(done) if workers == 1 else None, "workers": workers,
            "seconds": time.time() - start}
    return SyntheticSet(torch.cat([p[0] for p in parts]), y, torch.cat([p[1] for p in parts]),
                        ids[torch.from_numpy(selected)], meta)


def batch_key(latents, selected, y, models: dict, teacher, chain_cfg: ChainConfig, cfg: CondenseConfig) -> str:
    """Everything a chain batch depends on: the pool, the plan, the labels, every model and the settings."""
    from shared.cache import config_hash, fingerprint, state_fingerprint
    nets = {k: state_fingerprint(models[k]) for k in ("first_encoder", "second_encoder", "noise_estimators", "decoder")}
    return config_hash(fingerprint(latents), fingerprint(torch.from_numpy(np.ascontiguousarray(selected))),
                       fingerprint(y), nets, state_fingerprint(teacher), chain_cfg, cfg)


def _guidance_teacher(models: dict, cfg: CondenseConfig, T: int):
    """The teacher that guides sampling, or None when `cfg.guidance` is 0."""
    if not (cfg.guidance >= 0 and np.isfinite(cfg.guidance)):
        raise ValueError(f"guidance must be a finite number >= 0, got {cfg.guidance}")
    if cfg.guidance_steps < 0:
        raise ValueError(f"guidance_steps must be >= 0 (0, or T={T} and above: every step), got "
                         f"{cfg.guidance_steps} (--guidance-steps)")
    if not cfg.guidance:
        return None
    parse_guidance_terms(cfg.guidance_terms)
    if models.get("teacher") is None:
        raise ValueError(f"guidance {cfg.guidance} needs the server's teacher in models['teacher'] "
                         "(server.distill.teacher.load_or_train_teacher); pass one, or set guidance 0 (--guidance 0)")
    return models["teacher"]
