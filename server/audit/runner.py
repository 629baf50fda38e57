"""`fedcondense audit RUN_DIR`: rerunnable privacy audit of a run -> audit.json + audit.html.

Members are real private images whose latents conditioned the audited synthetic set (manifest);
non-members are private images that conditioned nothing. Figures are PNG files next to the page.
"""
from __future__ import annotations

import json
import time
from dataclasses import fields, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from client.privacy import gaussian_mechanism
from server.audit import attacks
from server.audit.report import is_central
from server.condense.chain import SyntheticSet, condense, save_grid
from server.condense.pretrain import load_chain
from server.distill.student import train_student
from server.distill.teacher import load_teacher, train_teacher
from shared.accounting import ImageRelease, default_delta, noise_for_epsilon
from shared.cache import cache_root
from shared.config import ChainConfig, CondenseConfig, DataConfig, StudentConfig
from shared.data import ImageSplit, load_dataset
from shared.models.first_encoder import Decoder, FirstEncoder
from shared.partition import partition


def public_config_dict(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _cfg(cls, d: dict):
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def resolve_real_index(report: dict, ds, ids: torch.Tensor, run: Path) -> torch.Tensor:
    """Manifest ids -> positions in the private split (federated ids: rank * 1e7 + position, rank =
    the node's place among the pooled node ids, ascending: server/federation/pool.py)."""
    if report["mode"] != "federated":
        pos = {int(i): k for k, i in enumerate(ds.private.ids.tolist())}
        return torch.tensor([pos[int(i)] for i in ids.tolist()])
    parts, rank_to_pid = pooled_shares(report, ds, run)
    return torch.tensor([int(parts[rank_to_pid[int(i) // 10**7]][int(i) % 10**7]) for i in ids.tolist()])


def pooled_shares(report: dict, ds, run: Path) -> tuple[list, list[int]]:
    """A federated run's partition of the private split, and the share each pooled node held, by rank.

    The devices do not say which share they held. The auditor knows the simulation's partition rule (clients,
    alpha, seed) and matches each pooled node to the share of its record count, which the devices release
    (n is public under the replace-one relation); a partition with two shares of one size is refused."""
    fed = report["config"]["federation"]
    parts = partition(ds.private.labels.numpy(), len(report["federation"]["nodes"]), iid=fed["iid"],
                      alpha=fed["alpha"], seed=fed["partition_seed"])
    provenance = sorted((json.loads(line) for line in (run / "pool" / "provenance.jsonl").read_text().splitlines()),
                        key=lambda p: p["node_id"])
    if any((p.get("mechanism") or {}).get("group_size", 1) != 1 for p in provenance):
        raise ValueError(f"{run}: the devices released group means, so a node's record count does not name its "
                         "share; audit a run with --group-size 1 or a single-machine run (demo --local)")
    share_of_size: dict[int, list[int]] = {}
    for pid, rows in enumerate(parts):
        share_of_size.setdefault(len(rows), []).append(pid)
    ranks = []
    for p in provenance:
        pids = share_of_size.get(p["latents"], [])
        if len(pids) != 1:
            raise ValueError(f"{run}: node {p['node_id']} pooled {p['latents']} records, which matches "
                             f"{len(pids)} shares of the partition; the audit cannot tell members from non-members. "
                             "Audit a single-machine run (demo --local), or a federation whose shares differ in size")
        ranks.append(pids[0])
    return parts, ranks


def pooled_positions(report: dict, ds, run: Path) -> torch.Tensor:
    """Positions in the private split of every image the server pooled (the teacher trained on them all)."""
    if report["mode"] != "federated":
        return torch.arange(len(ds.private))
    parts, rank_to_pid = pooled_shares(report, ds, run)
    return torch.from_numpy(np.concatenate([np.asarray(parts[pid]) for pid in rank_to_pid])).long()


def run_checkpoint(report: dict, kind: str) -> Path:
    """The run's `kind` checkpoint: where report.json recorded it, or the entry of that name in this machine's
    cache (`FEDCONDENSE_CACHE`), so a run audited elsewhere, or after the cache moved, finds its models."""
    recorded, root = Path(report["checkpoints"][kind]), cache_root()
    for path in (recorded, root / recorded.name):
        if path.is_dir():
            return path
    raise FileNotFoundError(f"the run's {kind} checkpoint {recorded.name} is neither at {recorded} nor in the cache "
                            f"{root}; copy it there (or set FEDCONDENSE_CACHE to the folder that holds it)")


LIRA_MODES = ("offline", "online")


class AuditContext:
    def __init__(self, run: Path, device: torch.device, ipc: int | None = None, lira: str = "offline"):
        if lira not in LIRA_MODES:
            raise ValueError(f"--lira must be one of {', '.join(LIRA_MODES)}; got {lira!r}")
        self.run, self.device, self.lira = Path(run), device, lira
        self.report = json.loads((self.run / "report.json").read_text())
        cfg = self.report["config"]
        self.data_cfg = _cfg(DataConfig, cfg["data"])
        self.student_cfg = _cfg(StudentConfig, cfg["student"])
        self.chain_cfg = _cfg(ChainConfig, cfg["chain"])
        # a report without these keys was sampled without guidance
        self.condense_cfg = _cfg(CondenseConfig, {"guidance": 0.0, "guidance_terms": "label:1", "guidance_steps": 0,
                                                  **cfg["condense"]})
        self.ds = load_dataset(self.data_cfg)
        ipc = ipc or self.report["ipc"]
        self.synthetic = SyntheticSet.load(self.run / f"ipc{ipc}")
        self.autoencoder = run_checkpoint(self.report, "autoencoder")
        self.e1 = FirstEncoder.from_pretrained(self.autoencoder / "first_encoder", low_cpu_mem_usage=False).to(device).eval()
        self.decoder_config = dict(Decoder.load_config(self.autoencoder / "decoder"))
        privacy = self.report.get("privacy") or {}
        self.noised = privacy.get("mechanism", "none") != "none"
        self.central = is_central(privacy)
        if lira == "online" and not self.central:
            raise ValueError("--lira online is built for central-DP runs (--central-epsilon); audit this run with "
                             "--lira offline")
        self.claimed_epsilon = privacy.get("epsilon") if self.noised else None
        self.delta = privacy.get("delta") if self.noised else default_delta(len(self.ds.private))
        if self.central:       # public latents conditioned the set; every pooled record entered through the release
            self.members = pooled_positions(self.report, self.ds, self.run)
            self.nonmembers = torch.empty(0, dtype=torch.long)
        else:
            used = resolve_real_index(self.report, self.ds, self.synthetic.conditioning.flatten().unique(), self.run)
            unused = torch.from_numpy(np.setdiff1d(np.arange(len(self.ds.private)), used.numpy()))
            self.members, self.nonmembers = used, unused
        self.device_release = self._device_release()
        self.central_shadows: dict = {}          # (candidate members, shadows) -> OUT shadow sets, built once

    @cached_property
    def models(self) -> dict:
        """The run's E1, decoder, E2, chain and teacher, loaded once per audit."""
        return load_run_models(self)

    def _device_release(self) -> ImageRelease | None:
        """The devices' mechanism as the run's privacy ledger states it; None without local DP."""
        if not self.noised or self.central:
            return None
        g = json.loads((self.run / "privacy_ledger.json").read_text())["guarantee"]
        return ImageRelease(**{f.name: g[f.name] for f in fields(ImageRelease)})

    def released(self, latents: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the server held for these records: without local DP the latents and labels themselves; with it
        a fresh draw of the devices' release (randomized-response labels, Gaussian latents) through the server's
        own post-processing (the Wiener filter against the public split's prior: server/pipeline.py)."""
        release = self.device_release
        if release is None:
            return latents, labels
        from client.privacy import release_records
        from server.pipeline import released_pool
        z, y = release_records(latents, labels, release)
        fed = self.report["config"].get("federation") or {}
        pool, _, _ = released_pool(self.ds, self.e1, ImageSplit(z, y, ids), release, self.device,
                                   fed.get("denoise", "wiener"))
        return pool.images, pool.labels

    def candidates(self, n: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
        g = torch.Generator().manual_seed(seed)
        m = self.members[torch.randperm(len(self.members), generator=g)[:n]]
        o = self.nonmembers[torch.randperm(len(self.nonmembers), generator=g)[:min(n, len(m))]]
        return torch.cat([m, o]), np.r_[np.ones(len(m)), np.zeros(len(o))]


def membership(ctx: AuditContext, shadows: int, candidates: int) -> dict:
    """Conditioning membership: does a student trained on the set (soft labels alone) reveal which private
    images conditioned it?"""
    idx, is_member = ctx.candidates(candidates)
    x, y = ctx.ds.private.images[idx], ctx.ds.private.labels[idx]
    target = train_student(ctx.synthetic.images, ctx.synthetic.labels, ctx.student_cfg, ctx.device, desc="target")
    target_scores = attacks.example_scores(target, x.to(ctx.device), y.to(ctx.device))
    out = {"members": int(is_member.sum()), "nonmembers": int((1 - is_member).sum()),
           "loss_threshold": attacks.attack_figures(target_scores, is_member, ctx.delta),
           "released_set": {"nearest_synthetic": attacks.attack_figures(
               attacks.nearest_synthetic_scores(x, ctx.synthetic.images), is_member, ctx.delta)}}
    if shadows > 0:
        out["lira_offline"] = _lira(target_scores, shadow_scores(ctx, idx, x, y, shadows), is_member, ctx.delta)
        out["shadows"] = shadows
    return out


TEACHER_PUBLIC = ("central DP: the teacher trained on the public split alone, so no pooled record enters it and an OUT "
                  "shadow would be the target retrained on the same data; the loss-threshold attack stands")


def central_membership(ctx: AuditContext, shadows: int, candidates: int) -> dict:
    """Central DP: every pooled record entered the shipped artifacts through the one release, and no private
    latent conditioned the set. Members: pooled private images; non-members: test images, which nothing saw.
    Attacked: the released set (nearest synthetic image) and a student trained on the set alone, with LiRA's
    OUT shadows (`central_shadow_sets`) when `shadows` > 0."""
    x, y, is_member, member_idx = pooled_against_test(ctx, candidates)
    target = train_student(ctx.synthetic.images, ctx.synthetic.labels, ctx.student_cfg, ctx.device, desc="target")
    target_scores = attacks.example_scores(target, x, y)
    out = {"members": int(is_member.sum()), "nonmembers": int((1 - is_member).sum()),
           "members_are": "pooled private records (non-members: test images)",
           "loss_threshold": attacks.attack_figures(target_scores, is_member, ctx.delta),
           "released_set": {"nearest_synthetic": attacks.attack_figures(
               attacks.nearest_synthetic_scores(x.cpu(), ctx.synthetic.images), is_member, ctx.delta)}}
    if shadows > 0:
        set_only = lambda s, syn: attacks.example_scores(train_student(
            syn.images, syn.labels, replace(ctx.student_cfg, seed=1000 + s), ctx.device, desc=f"shadow {s}"), x, y)
        out.update(central_lira(ctx, target_scores, set_only, member_idx, x, y, is_member, shadows))
    return out


def central_lira(ctx: AuditContext, target_scores: np.ndarray, shadow_scores, member_idx: torch.Tensor,
                 x: torch.Tensor, y: torch.Tensor, is_member: np.ndarray, shadows: int) -> dict:
    """LiRA on a central-DP run's artifact: `shadow_scores(s, shadow set)` scores the candidates on the
    artifact rebuilt from shadow s; offline (`CENTRAL_SHADOWS`) or online (`CENTRAL_ONLINE_SHADOWS`) as
    `ctx.lira` says."""
    if ctx.lira == "online":
        sets, inside = central_online_shadows(ctx, member_idx, x, y, shadows)
        scores = np.stack([shadow_scores(s, syn) for s, syn in enumerate(sets)])
        online = attacks.lira_online(target_scores, scores, inside, is_member)
        return {"lira_online": _with_intervals(online, is_member, ctx.delta), "shadows": shadows,
                "shadows_are": CENTRAL_ONLINE_SHADOWS}
    scores = np.stack([shadow_scores(s, syn) for s, syn in enumerate(central_shadow_sets(ctx, member_idx, shadows))])
    return {"lira_offline": _lira(target_scores, scores, is_member, ctx.delta), "shadows": shadows,
            "shadows_are": CENTRAL_SHADOWS}


CENTRAL_SHADOWS = ("the one release repeated on the pool without the candidate members (the run's networks, clip norm "
                   "and noise multiplier, fresh noise), the run's chain set on the public split fitted to it as the "
                   "run's was; the attacker knows everything public, so only the release's noise and the student's "
                   "seed vary")


def central_shadow_sets(ctx: AuditContext, member_idx: torch.Tensor, shadows: int) -> list[SyntheticSet]:
    """OUT shadow sets of a central-DP run (`CENTRAL_SHADOWS`), built once per audit and kept on `ctx`."""
    key = (tuple(member_idx.tolist()), shadows)
    if key not in ctx.central_shadows:
        release = CentralRelease(ctx, _without(ctx, member_idx))
        ctx.central_shadows[key] = [release.shadow_set() for _ in range(shadows)]
    return ctx.central_shadows[key]


CENTRAL_ONLINE_SHADOWS = ("the one release repeated on the pool without every candidate, plus a fresh random half of "
                          "the candidates (members and non-members alike), with fresh noise; then the run's chain set "
                          "fitted to it and the students trained on it: each candidate is IN about half the shadows")


def central_online_shadows(ctx: AuditContext, member_idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                           shadows: int, seed: int = 7) -> tuple[list[SyntheticSet], np.ndarray]:
    """LiRA online's shadows for a central-DP run (`CENTRAL_ONLINE_SHADOWS`) and which candidates each holds
    ((shadows, candidates) booleans); built once per audit and kept on `ctx`."""
    key = ("online", tuple(member_idx.tolist()), shadows, seed)
    if key not in ctx.central_shadows:
        from client.encode import encode_images
        release = CentralRelease(ctx, _without(ctx, member_idx))
        candidates = encode_images(ctx.e1, x.cpu(), device=ctx.device)
        inside = np.random.default_rng(seed).random((shadows, len(x))) < 0.5
        sets = [release.shadow_set(candidates[torch.from_numpy(row)], y.cpu()[torch.from_numpy(row)]) for row in inside]
        ctx.central_shadows[key] = (sets, inside)
    return ctx.central_shadows[key]


def _without(ctx: AuditContext, member_idx: torch.Tensor) -> torch.Tensor:
    """Pool positions of every pooled record but the candidate members."""
    return torch.from_numpy(np.setdiff1d(pooled_positions(ctx.report, ctx.ds, ctx.run).numpy(), member_idx.numpy()))


class CentralRelease:
    """The run's one release (the embedding bank, clip norm and noise multiplier of its ledger) repeated on a
    shadow pool, and the run's public chain set fitted to it, as the run fitted its own."""

    def __init__(self, ctx: AuditContext, keep: torch.Tensor):
        from client.encode import encode_images
        from server.condense.private_target import EmbeddingBank
        self.ctx, self.privacy = ctx, ctx.report["privacy"]
        self.iterations = ctx.report["config"]["central"]["iterations"]
        self.nets = EmbeddingBank(**self.privacy["embedding"]).build(ctx.ds.public.images.shape[1],
                                                                     ctx.ds.public.images.shape[-1], ctx.device)
        self.base = self._sums(encode_images(ctx.e1, ctx.ds.private.images[keep], device=ctx.device),
                               ctx.ds.private.labels[keep])
        self.public = encode_images(ctx.e1, ctx.ds.public.images, device=ctx.device)

    def _sums(self, latents: torch.Tensor, labels: torch.Tensor):
        from server.condense.private_target import class_sums
        return class_sums(self.ctx.models["decoder"], latents, labels, self.ctx.ds.num_classes, self.nets,
                          self.privacy["clip_norm"], self.ctx.device)

    def shadow_set(self, extra_latents: torch.Tensor | None = None, extra_labels: torch.Tensor | None = None
                   ) -> SyntheticSet:
        """One shadow: the base pool (plus `extra` records), released with fresh noise, the public set fitted to it."""
        from server.condense.private_target import release_class_means
        stat = self.base
        if extra_latents is not None and len(extra_latents):
            more = self._sums(extra_latents, extra_labels)
            stat = replace(stat, sums=stat.sums + more.sums, counts=stat.counts + more.counts)
        ctx = self.ctx
        release = {"means": release_class_means(stat, self.privacy["noise_multiplier"]), "nets": self.nets,
                   "iterations": self.iterations}
        return condense(self.public, ctx.ds.public.labels, ctx.ds.public.ids, ctx.ds.num_classes,
                        {**ctx.models, "private_target": release}, ctx.chain_cfg,
                        replace(ctx.condense_cfg, ipc=ctx.report["ipc"]), ctx.device)


def pooled_against_test(ctx: AuditContext, candidates: int, seed: int = 1):
    """n pooled private images (members) and n test images (non-members): images, labels, membership."""
    pooled = pooled_positions(ctx.report, ctx.ds, ctx.run)
    g = torch.Generator().manual_seed(seed)
    n = min(candidates, len(pooled), len(ctx.ds.test))
    member_idx = pooled[torch.randperm(len(pooled), generator=g)[:n]]
    other_idx = torch.randperm(len(ctx.ds.test), generator=g)[:n]
    x = torch.cat([ctx.ds.private.images[member_idx], ctx.ds.test.images[other_idx]]).to(ctx.device)
    y = torch.cat([ctx.ds.private.labels[member_idx], ctx.ds.test.labels[other_idx]]).to(ctx.device)
    return x, y, np.r_[np.ones(n), np.zeros(n)], member_idx


def _lira(target_scores: np.ndarray, shadow_out: np.ndarray, is_member: np.ndarray, delta: float) -> dict:
    """LiRA offline's ROC figures, with the bootstrap intervals and epsilon bound of its statistic."""
    return _with_intervals(attacks.lira_offline(target_scores, shadow_out, is_member), is_member, delta)


def _with_intervals(lira: dict, is_member: np.ndarray, delta: float) -> dict:
    """A LiRA result's figures, its per-example statistic replaced by its bootstrap intervals and epsilon bound."""
    statistic = lira.pop("scores")
    return {**lira, "ci": attacks.bootstrap_intervals(statistic, is_member),
            "empirical_epsilon": attacks.empirical_epsilon(statistic, is_member, delta)}


def shipped_membership(ctx: AuditContext, shadows: int, candidates: int) -> dict:
    """Training membership of what is shipped: the run's teacher (trained on every pooled latent) and the
    student the run ships (its loss, distilled from that teacher). Members: pooled private images;
    non-members: test images, which nothing trained on. LiRA's OUT shadows retrain the teacher without the
    candidate members, and distil a student from each."""
    models = ctx.models
    if "teacher" not in models:
        return {"skipped": "the run trained no teacher (its student loss and sampling use none)"}
    teacher = models["teacher"]
    x, y, is_member, member_idx = pooled_against_test(ctx, candidates)
    n = len(member_idx)
    student = shipped_student(ctx, teacher, ctx.student_cfg.seed)
    targets = {"teacher": teacher, "student": student}
    out = {"members": n, "nonmembers": n, "student_loss": ctx.student_cfg.loss}
    scores = {name: attacks.example_scores(model, x, y) for name, model in targets.items()}
    for name in targets:
        out[name] = {"loss_threshold": attacks.attack_figures(scores[name], is_member, ctx.delta)}
    if ctx.central:
        out["teacher"]["lira_skipped"] = TEACHER_PUBLIC
    if shadows > 0 and ctx.central:
        shipped = lambda s, syn: attacks.example_scores(shipped_student(ctx, teacher, 1000 + s, syn), x, y)
        found = central_lira(ctx, scores["student"], shipped, member_idx, x, y, is_member, shadows)
        out["shadows"], out["shadows_are"] = found.pop("shadows"), found.pop("shadows_are")
        out["student"].update(found)
    elif shadows > 0:
        outs = shadow_teachers_and_students(ctx, models, member_idx, x, y, shadows)
        for name in targets:
            out[name]["lira_offline"] = _lira(scores[name], outs[name], is_member, ctx.delta)
        out["shadows"] = shadows
    return out


def shipped_student(ctx: AuditContext, teacher, seed: int, syn: SyntheticSet | None = None):
    """The student the run ships (its loss, distilled from `teacher`), trained on `syn` (default: the run's set)."""
    syn = ctx.synthetic if syn is None else syn
    cfg = replace(ctx.student_cfg, seed=seed)
    uses_teacher = cfg.loss != "soft_ce"
    return train_student(syn.images, syn.labels, cfg, ctx.device, loss=cfg.loss,
                         teacher=teacher if uses_teacher else None, desc=f"shipped student s{seed}")


def shadow_teachers_and_students(ctx: AuditContext, models: dict, member_idx, x, y, shadows: int) -> dict:
    """Per shadow: a teacher trained as the run's was, on the pool without the candidate members (under local
    DP, on a fresh draw of the devices' release of it, filtered as the server filtered the run's), and a
    student distilled from it on the released set; each model's scores on every candidate."""
    from client.encode import encode_images
    keep = torch.from_numpy(np.setdiff1d(pooled_positions(ctx.report, ctx.ds, ctx.run).numpy(), member_idx.numpy()))
    latents = encode_images(ctx.e1, ctx.ds.private.images[keep], device=ctx.device)
    labels, ids = ctx.ds.private.labels[keep], ctx.ds.private.ids[keep]
    out = {"teacher": [], "student": []}
    for s in range(shadows):
        pool_latents, pool_labels = ctx.released(latents, labels, ids)
        teacher, _ = train_teacher(ctx.e1, models["second_encoder"], pool_latents, pool_labels, ctx.ds.num_classes,
                                   ctx.device, steps=ctx.student_cfg.teacher_steps, seed=1000 + s)
        out["teacher"].append(attacks.example_scores(teacher, x, y))
        out["student"].append(attacks.example_scores(shipped_student(ctx, teacher, 1000 + s), x, y))
    return {k: np.stack(v) for k, v in out.items()}


def load_run_models(ctx: AuditContext) -> dict:
    e2, est = load_chain(run_checkpoint(ctx.report, "chain"), ctx.device)
    models = {"first_encoder": ctx.e1, "decoder": Decoder.from_pretrained(ctx.autoencoder / "decoder", low_cpu_mem_usage=False).to(ctx.device).eval(),
              "second_encoder": e2, "noise_estimators": est}
    if "teacher" in ctx.report["checkpoints"]:
        models["teacher"] = load_teacher(run_checkpoint(ctx.report, "teacher"), ctx.e1, e2, ctx.ds.num_classes, ctx.device)
    return models


def shadow_scores(ctx: AuditContext, candidate_idx, x, y, shadows: int) -> np.ndarray:
    """OUT shadows: synthetic sets conditioned on private latents that exclude every candidate (under local DP,
    on a fresh draw of the devices' release of them, filtered as the server filtered the run's).

    Scope: shadows reuse the run's chain, which was trained on all pooled latents (candidates
    included; under local DP on the public split), so the audit measures leakage through conditioning and
    the student, not through chain training."""
    keep = torch.from_numpy(np.setdiff1d(np.arange(len(ctx.ds.private)), candidate_idx.numpy()))
    pool = ctx.ds.private.subset(keep)
    from client.encode import encode_images
    latents = encode_images(ctx.e1, pool.images, device=ctx.device)
    models = ctx.models
    scores = []
    for s in range(shadows):
        released, labels = ctx.released(latents, pool.labels, pool.ids)
        syn = condense(released, labels, pool.ids, ctx.ds.num_classes, models, ctx.chain_cfg,
                       replace(ctx.condense_cfg, seed=1000 + s, selection="random"), ctx.device)
        model = train_student(syn.images, syn.labels, replace(ctx.student_cfg, seed=1000 + s), ctx.device, desc=f"shadow {s}")
        scores.append(attacks.example_scores(model, x.to(ctx.device), y.to(ctx.device)))
    return np.stack(scores)


def inversion(ctx: AuditContext, steps: int, n: int, figures: Path) -> dict:
    """An attacker with E1 and public data inverts submitted latents; with and without DP noise."""
    idx, _ = ctx.candidates(n)
    idx = idx[:n]
    x = ctx.ds.private.images[idx].to(ctx.device)
    with torch.no_grad():
        clean = ctx.e1(x)
    clip = float(clean.flatten(1).norm(dim=1).median())
    delta = default_delta(len(ctx.ds.private))
    settings = {"no DP": None, **{f"epsilon={e:g}": noise_for_epsilon(e, delta) for e in (8.0, 1.0)}}
    factory = lambda: Decoder(**public_config_dict(ctx.decoder_config))
    results, rows = {}, [x.cpu()]
    for name, sigma in settings.items():
        inv = attacks.train_inverter(ctx.e1, factory, ctx.ds.public.images, steps, ctx.device,
                                     noise_std=0.0 if sigma is None else sigma * clip)
        z = clean if sigma is None else gaussian_mechanism(clean.cpu(), clip, sigma).to(ctx.device)
        with torch.no_grad():
            rec = inv(z).cpu()
        results[name] = {"psnr_db": float(attacks.psnr(rec, x.cpu()).mean()), "ssim": float(attacks.ssim(rec, x.cpu()).mean()),
                         "noise_multiplier": sigma, "clip_norm": clip}
        rows.append(rec)
    grid = torch.cat([r[:10] for r in rows])
    save_grid(grid, torch.arange(len(rows)).repeat_interleave(10), figures / "inversion.png")
    return {"settings": results, "rows": ["original", *settings], "images": n, "inverter_steps": steps}


def memorisation(ctx: AuditContext, figures: Path, reference: int = 20000) -> dict:
    """Nearest real training image of each synthetic image vs real-to-real nearest distances."""
    g = torch.Generator().manual_seed(0)
    ref_idx = torch.randperm(len(ctx.ds.private), generator=g)[:reference]
    ref = ctx.ds.private.images[ref_idx]
    syn_d, syn_nn = attacks.nearest_distances(ctx.synthetic.images, ref)
    real_q = ref[:1000]
    real_d, _ = attacks.nearest_distances(real_q, ref, exclude_self=True)
    order = np.argsort(syn_d)[:8]
    pairs = torch.cat([ctx.synthetic.images[torch.from_numpy(order)], ref[torch.from_numpy(syn_nn[order])]])
    save_grid(pairs, torch.arange(2).repeat_interleave(8), figures / "closest_pairs.png", per_class=8)
    return {"synthetic_to_real": {"min": float(syn_d.min()), "median": float(np.median(syn_d))},
            "real_to_real": {"min": float(real_d.min()), "median": float(np.median(real_d))},
            "fraction_synthetic_closer_than_real_median": float((syn_d < np.median(real_d)).mean()),
            "reference_images": int(len(ref)), "hist": {"synthetic": syn_d.tolist(), "real": real_d.tolist()}}


def utility_curve(run: Path, others: list[Path]) -> list[dict]:
    points = []
    for d in [run, *others]:
        rep = json.loads((Path(d) / "report.json").read_text())
        eps = (rep.get("privacy") or {}).get("epsilon", "inf")
        points.append({"run": str(d), "epsilon": eps, "accuracy": rep["accuracy"]["synthetic"],
                       "random_real": rep["accuracy"].get("random_real")})
    return sorted(points, key=lambda p: float(p["epsilon"]) if p["epsilon"] != "inf" else float("inf"))


def run_audit(run: Path, device: torch.device, shadows: int = 4, candidates: int = 500, inverter_steps: int = 300,
              compare: list[Path] = (), lira: str = "offline") -> dict:
    start = time.time()
    ctx = AuditContext(run, device, lira=lira)
    figures = Path(run) / "audit"
    figures.mkdir(parents=True, exist_ok=True)
    result = {"run": str(run), "mode": ctx.report["mode"], "privacy": ctx.report.get("privacy"),
              "claimed_epsilon": ctx.claimed_epsilon, "delta": ctx.delta,
              "membership": central_membership(ctx, shadows, candidates) if ctx.central else membership(ctx, shadows, candidates),
              "shipped": shipped_membership(ctx, shadows, candidates),
              "inversion": inversion(ctx, inverter_steps, 200, figures),
              "memorisation": memorisation(ctx, figures),
              "privacy_utility": utility_curve(Path(run), list(compare))}
    result["verdict"] = verdict(result)
    result["seconds"] = time.time() - start
    from server.audit.report import write_report
    write_report(result, figures)
    return result


def attack_rows(result: dict) -> list[dict]:
    """Every attack the audit ran: target, attack, AUC with its interval, TPR at 0.1 % FPR, epsilon bound."""
    members = "pooled records" if "members_are" in result["membership"] else "conditioning members"
    targets = [(f"student (soft labels) on {members}", result["membership"]),
               (f"released set on {members}", result["membership"].get("released_set", {}))]
    shipped = result.get("shipped", {})
    targets += [(f"shipped {name} on training members", shipped[name]) for name in ("teacher", "student") if name in shipped]
    rows = []
    for target, attacks_run in targets:
        for attack in (*attacks.MODEL_ATTACKS, "nearest_synthetic"):
            if attack in attacks_run:
                r = attacks_run[attack]
                rows.append({"target": target, "attack": attack, "auc": r["auc"], "auc_ci": r["ci"]["auc"],
                             "tpr_at_0.1pct_fpr": r["tpr_at_0.1pct_fpr"], "tpr_at_1pct_fpr": r["tpr_at_1pct_fpr"],
                             "epsilon_lower_bound": r["empirical_epsilon"]["epsilon_lower_bound"]})
    return rows


def verdict(result: dict) -> dict:
    """One paragraph an auditor can sign or refuse: the claim, the strongest attack, and whether it refutes."""
    rows = attack_rows(result)
    strongest = max(rows, key=lambda r: r["epsilon_lower_bound"])
    best_auc = max(rows, key=lambda r: r["auc"])
    attack = (f"The strongest attack ({strongest['attack']} against the {strongest['target']}) proves epsilon >= "
              f"{strongest['epsilon_lower_bound']:.2f} at 95 % confidence (delta {result['delta']:.2g}); the highest AUC is "
              f"{best_auc['auc']:.3f} [{best_auc['auc_ci'][0]:.3f}, {best_auc['auc_ci'][1]:.3f}] ({best_auc['attack']}, "
              f"{best_auc['target']}).")
    claimed = result.get("claimed_epsilon")
    if claimed is None:
        text = ("No differential-privacy claim is made for this run (epsilon = inf): nothing here can be signed as a "
                f"privacy guarantee. {attack} These figures measure what the released set, teacher and student leak.")
        status = "no claim"
    else:
        refuted = strongest["epsilon_lower_bound"] > claimed
        central = is_central(result.get("privacy"))
        scope = ("per pooled record (image and label), for what the trusted server ships: the set, the student and "
                 "the teacher are post-processing of its one release and of the public split" if central else
                 "per image, for every field a device releases; the teacher, the set and the student are "
                 "post-processing of that release")
        text = (f"Claimed: epsilon = {claimed:.3g}, delta = {result['delta']:.2g} {scope}. {attack} "
                + ("This exceeds the claim: the claim is REFUTED and must not be signed."
                   if refuted else "This is within the claim: the attacks do not refute it (an audit can refute a claim, "
                                   "never prove one)."))
        status = "refuted" if refuted else "not refuted"
    return {"status": status, "text": text, "strongest": strongest, "attacks": rows}
