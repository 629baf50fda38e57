"""The single-machine pipeline behind `fedcondense demo`.

data -> autoencoder (public split) -> E1 latents of the private split (client side) -> E2 + chain
-> condensation per IPC -> students: synthetic, random real of equal size, full real -> report.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from client.encode import encode_images
from server.distill.baseline_cache import baseline_score
from server.condense.chain import SyntheticSet, condense, decode_latents
from server.distill.losses import needs_teacher, teacher_views
from server.condense.pretrain import load_or_train_autoencoder, load_or_train_chain
from server.distill.evaluate import LabelledSet, evaluate_sets
from server.condense.formation import expand
from server.distill.student import evaluate, fit_and_score, one_hot
from server.distill.teacher import load_or_train_teacher
from shared.cache import to_jsonable
from shared.config import DemoConfig, StudentConfig
from shared.data import Dataset, ImageSplit, load_dataset
from shared.durable import run_lock, write_json
from shared.device import device_name, keep_freed_memory, resolve_device, seed_everything


def random_real_like(private: ImageSplit, synthetic: SyntheticSet, seed: int) -> ImageSplit:
    """A random real subset with the synthetic set's per-class image counts (its argmax labels)."""
    gen = torch.Generator().manual_seed(seed)
    want = torch.bincount(synthetic.labels.argmax(1), minlength=int(private.labels.max()) + 1)
    picks = []
    for c, n in enumerate(want.tolist()):
        pool = torch.nonzero(private.labels == c).flatten()
        picks.append(pool[torch.randperm(len(pool), generator=gen)[:n]])
    return private.subset(torch.cat(picks))


def chain_models(e1, dec, pool: ImageSplit, cfg: DemoConfig, device: torch.device,
                 committed: dict | None = None) -> tuple[dict, dict]:
    """The server's models for condensing `pool`: E1 / D, and E2 + chain trained (or loaded) on its latents."""
    e2, est, chain = load_or_train_chain(pool.images, cfg.chain, device, committed)
    return {"first_encoder": e1, "decoder": dec, "second_encoder": e2, "noise_estimators": est}, chain


def committed_match(e1, pool: ImageSplit, ds: Dataset, noised: bool) -> dict | None:
    """What a committed chain or teacher must match (server/condense/committed.py), when `pool` is the whole private
    split released without noise; None otherwise (the run trains its own)."""
    k = ds.num_classes
    whole = len(pool) == len(ds.private) and torch.equal(torch.bincount(pool.labels, minlength=k),
                                                         torch.bincount(ds.private.labels, minlength=k))
    if noised or not whole:
        return None
    from shared.cache import state_fingerprint
    return {"e1_fingerprint": state_fingerprint(e1)}


def build_models(ds: Dataset, cfg: DemoConfig, device: torch.device) -> tuple[dict, ImageSplit, dict]:
    """Single machine: pretrain/load every model and encode the private split into the pool that
    `demo --local` condenses (used by `condense`, `distill`, `pretrain chain`)."""
    e1, dec, ae = load_or_train_autoencoder(ds.public.images, cfg.autoencoder, device)
    latents, encode_s = encode_local(ds, e1, device)
    pool = ImageSplit(latents, ds.private.labels, ds.private.ids)
    models, chain = chain_models(e1, dec, pool, cfg, device, committed_match(e1, pool, ds, noised=False))
    info = {"pretrain": ae["seconds"] + chain["seconds"], "encode": encode_s,
            "checkpoints": {"autoencoder": ae["path"], "chain": chain["path"]}}
    return models, pool, info


def encode_local(ds: Dataset, e1, device: torch.device) -> tuple[torch.Tensor, float]:
    start = time.time()
    latents = encode_images(e1, ds.private.images, device=device)
    return latents, time.time() - start


def run_ipc(ds: Dataset, models: dict, pool: ImageSplit, cfg: DemoConfig, ipc: int, out: Path,
            device: torch.device, teacher=None) -> dict:
    """`pool`: the real latents (as `images`) with labels and ids that the server condenses.
    Every student arm trains with the same recipe: `cfg.student.loss`, with `teacher` when it has one."""
    ccfg = replace(cfg.condense, ipc=ipc)
    work = out / f".condense-ipc{ipc}"
    syn = condense_resumable(pool, ds, models, cfg, ccfg, device, work)
    syn.save(out / f"ipc{ipc}", ds.class_names)
    result = {"ipc": ipc, "synthetic_images": len(syn), "real_images_used": syn.meta["real_latents_used"],
              "seconds_condense": syn.meta["seconds"],
              **_score_arms(ds, syn, cfg, cfg.student, device, teacher, f"ipc{ipc}", work / "students")}
    shutil.rmtree(work, ignore_errors=True)
    if cfg.eval_seeds > 1:
        result["over_seeds"] = _over_seeds(ds, models, pool, cfg, ccfg, result, device, teacher, out)
    return result


def condense_resumable(pool: ImageSplit, ds: Dataset, models: dict, cfg: DemoConfig, ccfg, device, work: Path):
    """`condense` keeping finished chain batches in `work`: a run killed during condensation, or during the
    students that follow it (their checkpoints are kept in `work/students`), and started again resumes
    there, with the same result (server/condense/batches.py, shared/checkpoint.py). The caller removes
    `work` once the set is scored."""
    return condense(pool.images, pool.labels, pool.ids, ds.num_classes, models, cfg.chain, ccfg, device, work)


def _score_arms(ds: Dataset, syn: SyntheticSet, cfg: DemoConfig, student: StudentConfig, device, teacher,
                tag: str, work: Path | None = None) -> dict:
    """The synthetic arm, and the random real arm of the same per-class counts (drawn with the student's
    seed) when `cfg.baselines` asks for it; both with `student`'s recipe. `work`: the students'
    training checkpoints (shared/checkpoint.py)."""
    if cfg.protocol == "standard":
        return _score_standard(ds, syn, cfg, student, device, work)
    images, labels = expand(syn.images, syn.labels, syn.meta.get("formation", 1))
    arms = {"synthetic": fit_and_score(images, labels, ds.test, student, device, loss=student.loss,
                                       desc=f"student {tag}", teacher=teacher,
                                       checkpoint=work / "synthetic.pt" if work else None)}
    if "random_real" in cfg.baselines:
        real = random_real_like(ds.private, syn, student.seed)
        arms["random_real"] = baseline_score("random_real", real.images, one_hot(real.labels, ds.num_classes), ds.test,
                                             student, device, loss=student.loss, desc=f"random real {tag}",
                                             teacher=teacher, reuse=cfg.reuse_baselines)
    return arms


def _score_standard(ds: Dataset, syn: SyntheticSet, cfg: DemoConfig, student: StudentConfig, device,
                    work: Path | None = None) -> dict:
    """The field's standard protocol (server/distill/evaluate.py): ConvNet-3 evaluators from scratch on each set alone;
    the random real arm has the synthetic set's per-class counts, drawn with the student seed."""
    sets = [LabelledSet("synthetic", syn.images, syn.labels, syn.meta.get("formation", 1))]
    if "random_real" in cfg.baselines:
        real = random_real_like(ds.private, syn, student.seed)
        sets.append(LabelledSet("random_real", real.images, one_hot(real.labels, ds.num_classes)))
    result = evaluate_sets(sets, ds.test, replace(cfg.evaluation, seed=cfg.evaluation.seed + student.seed), device,
                           work)
    share = result["seconds"] / len(sets)
    return {name: {"accuracy": r["mean"], "std": r["std"], "evaluators": r["accuracy"], "seconds": share,
                   "images": r["stored_images"], "epochs": cfg.evaluation.epochs, "protocol": "standard"}
            for name, r in result["sets"].items()}


def _over_seeds(ds: Dataset, models: dict, pool: ImageSplit, cfg: DemoConfig, ccfg, first: dict, device,
                teacher, out: Path) -> dict:
    """`cfg.eval_seeds` repetitions of the IPC's arms: repetition s condenses with seed ccfg.seed + s and
    trains/draws the random subset with student seed + s (s = 0 is `first`), so that the comparison
    with random real images is paired per seed and does not rest on one draw of each. Only repetition 0's
    synthetic set is saved."""
    start = time.time()
    acc = {k: [first[k]["accuracy"]] for k in ("synthetic", "random_real") if k in first}
    reused = [0] if "cached" in first.get("random_real", {}) else []
    for s in range(1, cfg.eval_seeds):
        work = out / f".condense-ipc{ccfg.ipc}-seed+{s}"
        syn = condense_resumable(pool, ds, models, cfg, replace(ccfg, seed=ccfg.seed + s), device, work)
        arms = _score_arms(ds, syn, cfg, replace(cfg.student, seed=cfg.student.seed + s), device, teacher,
                           f"ipc{ccfg.ipc} seed +{s}", work / "students")
        shutil.rmtree(work, ignore_errors=True)
        for k, r in arms.items():
            acc[k].append(r["accuracy"])
        reused += [s] if "cached" in arms.get("random_real", {}) else []
    return {"seed_offsets": list(range(cfg.eval_seeds)), "accuracy": acc, **paired_lead(acc),
            "random_real_reused": reused, "seconds": time.time() - start}


def paired_lead(acc: dict) -> dict:
    """Mean and std of each arm over seeds, and the synthetic set's paired lead over random real images:
    mean per-seed difference, its standard error, and the seeds it wins."""
    out = {f"mean_{k}": float(np.mean(v)) for k, v in acc.items()}
    out.update({f"std_{k}": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for k, v in acc.items()})
    if "random_real" in acc:
        d = np.subtract(acc["synthetic"], acc["random_real"])
        out.update(lead=float(d.mean()), lead_se=float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0,
                   wins=int((d > 0).sum()), seeds=len(d))
    return out


def run_full_real(ds: Dataset, cfg: DemoConfig, device: torch.device, teacher=None) -> dict:
    steps = max(1, int(cfg.student.full_epochs * len(ds.private) / cfg.student.batch_size))
    return baseline_score("full_real", ds.private.images, one_hot(ds.private.labels, ds.num_classes), ds.test,
                          cfg.student, device, steps=steps, loss=cfg.student.loss, desc="full real", teacher=teacher,
                          reuse=cfg.reuse_baselines)


def server_teacher(models: dict, pool: ImageSplit, ds: Dataset, student: StudentConfig, device: torch.device,
                   guidance: float = 0.0, committed: dict | None = None, protocol: str = "teacher-kd"):
    """The teacher for knowledge distillation (docs/spec.md §2) and sampling guidance, trained on the pooled
    latents the server holds, with its test accuracy; (None, None) when neither the students nor guidance use it."""
    if not ((protocol == "teacher-kd" and needs_teacher(student.loss)) or guidance):
        return None, None
    teacher, info = load_or_train_teacher(models, pool.images, pool.labels, ds.num_classes, device,
                                          student.teacher_steps, committed)
    return teacher, {**info, "accuracy": evaluate(teacher, ds.test.images, ds.test.labels, device)}


def canonical_pool(pool: ImageSplit) -> ImageSplit:
    """The federated pool in a content-defined order: by label, then latent values (fp16 bits).

    Clients reply in any order, so the pool's row order may change from run to run; training on a
    canonical order makes the chain, the teacher and the synthetic set independent of arrival order,
    so a repeated or resumed run hits the checkpoint cache. Ids move with their rows (provenance).
    """
    z = pool.images.to(torch.float16)
    bits = z.flatten(1).view(torch.int16).numpy()
    order = np.lexsort([*bits.T[::-1], pool.labels.numpy()])          # primary key last: label
    idx = torch.from_numpy(order)
    return ImageSplit(z[idx].float(), pool.labels[idx], pool.ids[idx])


def released_pool(ds: Dataset, e1, pool: ImageSplit, release, device: torch.device,
                  denoise: str = "wiener") -> tuple[ImageSplit, ImageSplit, dict]:
    """(the pool the server condenses, the latents its chain trains on, notes for the report).

    Without noise both are `pool`. Under local DP the chain trains on the public split's latents, clean and
    free, instead of on noise; and the pool is replaced by its posterior means (server/condense/denoise.py)
    unless `denoise` is 'none'. Both are post-processing of released values and public data."""
    if release is None or not release.private:
        return pool, pool, {"chain_trained_on": "pool"}
    from server.condense.denoise import class_covariances, wiener_denoise
    public = encode_images(e1, ds.public.images, device=device)
    notes = {"chain_trained_on": "public split (the pool is noised)", "pool_denoising": denoise,
             "noise_std": release.noise_std, "group_size": release.group_size}
    if denoise == "wiener":
        prior = class_covariances(public, ds.public.labels, ds.num_classes, release.clip_norm)
        pool = ImageSplit(wiener_denoise(pool.images, pool.labels, prior, release.noise_std, release.group_size),
                          pool.labels, pool.ids)
    elif denoise != "none":
        raise ValueError(f"unknown pool denoising '{denoise}'; use 'wiener' or 'none'")
    return pool, ImageSplit(public, ds.public.labels, ds.public.ids), notes


def central_release(ds: Dataset, e1, dec, pool: ImageSplit, cfg: DemoConfig, device: torch.device, out: Path
                    ) -> tuple[ImageSplit, ImageSplit, dict, dict]:
    """Central DP (server/condense/private_target.py): the pool's one release, and the public split as both the
    conditioning pool and the chain's training set. Returns (pool to condense, chain source, the release for
    the refinement, the privacy entry); the entry is also written to the run's privacy ledger."""
    from server.condense.private_target import (CENTRAL_NEIGHBOURING, EmbeddingBank, class_sums,
                                                clip_norm_from_public, release_class_means)
    from shared.accounting import ImageRelease, noise_for_epsilon
    c = cfg.central
    public = ImageSplit(encode_images(e1, ds.public.images, device=device), ds.public.labels, ds.public.ids)
    bank = EmbeddingBank(c.nets, c.width, cfg.data.seed)
    nets = bank.build(ds.public.images.shape[1], ds.public.images.shape[-1], device)
    clip = clip_norm_from_public(nets, decode_latents(dec, public.images, device), device)
    sigma = noise_for_epsilon(c.epsilon, c.delta)
    target = release_class_means(class_sums(dec, pool.images, pool.labels, ds.num_classes, nets, clip, device), sigma)
    entry = {"mechanism": "central Gaussian: class sums of clipped random-ConvNet embeddings and class counts, "
                          "released once by the server", "threat_model": "trusted server, untrusted consumers",
             "epsilon": ImageRelease(clip, sigma, c.delta, "public").epsilon("pld"), "target_epsilon": c.epsilon,
             "delta": c.delta, "noise_multiplier": sigma, "clip_norm": clip, "sensitivity": 2 * clip,
             "neighbouring": CENTRAL_NEIGHBOURING, "embedding": {"nets": c.nets, "width": c.width, "seed": bank.seed},
             "covers": "every pooled record (image and label) in the shipped synthetic set, student and teacher",
             "labels_public": False, "records": len(pool), "accountant": "dp-accounting PLD, REPLACE_ONE",
             "note": ("CENTRAL DP: the devices' latents reached the server without noise (sealed in transit); the "
                      "server is trusted, and the guarantee holds for what it ships. The chain, the conditioning "
                      "latents and the teacher come from the public split alone.")}
    ledger_path = out / "privacy_ledger.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else {"summary": entry}
    if "central" not in ledger and "summary" in ledger:
        ledger["device_release_summary"] = ledger["summary"]       # what the devices sent: no noise
    ledger.update(central=entry, summary=entry)
    write_json(ledger_path, ledger, indent=2)
    return public, public, {"means": target, "nets": nets, "iterations": c.iterations}, entry


def condense_and_evaluate(ds: Dataset, cfg: DemoConfig, e1, dec, pool: ImageSplit, info: dict, out: Path,
                          device: torch.device, release=None) -> dict:
    """Server steps after the latents are in: E2 + chain, condensation per IPC, students, report.
    `release`: the devices' mechanism (shared.accounting.ImageRelease) when the pool is noised.

    The random-real and full-real arms are evaluation baselines computed by the harness, which can
    see the real data; the server itself only ever holds `pool` (latents).
    """
    denoise = cfg.federation.denoise if cfg.federation else "wiener"
    pool, chain_source, info["released_pool"] = released_pool(ds, e1, pool, release, device, denoise)
    private_target = None
    if cfg.central.epsilon:
        pool, chain_source, private_target, info["privacy"] = central_release(ds, e1, dec, pool, cfg, device, out)
        info["released_pool"] = {"chain_trained_on": "public split (central DP: the pool enters through one release)"}
    committed = committed_match(e1, chain_source, ds, noised=release is not None and release.private)
    models, chain = chain_models(e1, dec, chain_source, cfg, device, committed)
    models["private_target"] = private_target
    info = {**info, "pretrain": info["pretrain"] + chain["seconds"],
            "checkpoints": {**info["checkpoints"], "chain": chain["path"]}}
    info["committed_checkpoints"] = {k: v["committed"] for k, v in (("autoencoder", info.get("autoencoder", {})),
                                                                    ("chain", chain)) if v.get("committed")}
    teacher, info["teacher"] = server_teacher(models, pool, ds, cfg.student, device, cfg.condense.guidance,
                                              committed, cfg.protocol)
    if (info["teacher"] or {}).get("committed"):
        info["committed_checkpoints"]["teacher"] = info["teacher"]["committed"]
    models["teacher"] = teacher
    if teacher is not None:                       # the audit's shadow runs sample under the same guidance
        info["checkpoints"]["teacher"] = info["teacher"]["path"]
    per_ipc = [run_ipc(ds, models, pool, cfg, ipc, out, device, teacher) for ipc in cfg.ipcs]
    full = run_full_real(ds, cfg, device, teacher) if "full_real" in cfg.baselines else None
    if full is not None and cfg.protocol == "standard":
        full["protocol"] = "teacher-kd student recipe (the standard protocol's 300 epochs on every image is a GPU job)"
    report = make_report(ds, cfg, info, per_ipc, full, device, len(pool))
    write_json(out / "report.json", report, indent=2)
    return report


def prepare_server(cfg: DemoConfig, out: Path):
    """What every run starts with: the allocator setting, output dir, device, seeds, data, and E1/D from the
    public split. The setting is applied here so that every way of starting a run gets it, a script calling
    `run_demo` or `run_simulation_demo` as well as the CLI."""
    keep_freed_memory()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    seed_everything(cfg.data.seed)
    ds = load_dataset(cfg.data)
    e1, dec, ae = load_or_train_autoencoder(ds.public.images, cfg.autoencoder, device)
    return out, device, ds, e1, dec, ae


def run_demo(cfg: DemoConfig, out: Path) -> dict:
    """Single-machine pipeline (no federation): the server encodes the private split itself."""
    with run_lock(out):
        return _run_demo(cfg, out)


def _run_demo(cfg: DemoConfig, out: Path) -> dict:
    out, device, ds, e1, dec, ae = prepare_server(cfg, out)
    latents, encode_s = encode_local(ds, e1, device)
    info = {"mode": "single-machine", "pretrain": ae["seconds"], "encode": encode_s, "autoencoder": ae,
            "checkpoints": {"autoencoder": ae["path"]}}
    pool = ImageSplit(latents, ds.private.labels, ds.private.ids)
    return condense_and_evaluate(ds, cfg, e1, dec, pool, info, out, device)


def make_report(ds: Dataset, cfg: DemoConfig, info: dict, per_ipc: list[dict], full: dict | None, device,
                real_available: int) -> dict:
    main = per_ipc[0]
    acc = lambda r, k: r[k]["accuracy"] if k in r else None
    return {
        "mode": info["mode"], "recipe": cfg.recipe, "protocol": cfg.protocol,
        "evaluation": to_jsonable(cfg.evaluation) if cfg.protocol == "standard" else None,
        "committed_checkpoints": info.get("committed_checkpoints", {}), "dataset": ds.name, "T": cfg.chain.T, "layout": cfg.chain.layout, "selection": cfg.condense.selection,
        "class_plan": cfg.condense.class_plan, "ipc": main["ipc"],
        "synthetic_images": main["synthetic_images"], "real_images_used": main["real_images_used"],
        "real_images_available": real_available, "public_images": len(ds.public), "test_images": len(ds.test),
        "accuracy": {"synthetic": acc(main, "synthetic"), "random_real": acc(main, "random_real"),
                     "full_real": full["accuracy"] if full else None},
        "over_seeds": main.get("over_seeds"),
        "student_loss": cfg.student.loss, "teacher": info.get("teacher"),
        "teacher_views": teacher_views(cfg.student.loss, cfg.student.teacher_strength) if info.get("teacher") else None,
        "seconds": {"pretrain": info["pretrain"], "encode": info.get("encode"),
                    "teacher": (info.get("teacher") or {}).get("seconds", 0.0),
                    "collect": info.get("federation", {}).get("collect_seconds"),
                    "condense": sum(r["seconds_condense"] for r in per_ipc),
                    "student": sum(r[k]["seconds"] for r in per_ipc for k in ("synthetic", "random_real") if k in r)
                               + (full["seconds"] if full else 0.0),
                    "over_seeds": sum(r["over_seeds"]["seconds"] for r in per_ipc if "over_seeds" in r)},
        "federation": info.get("federation"), "privacy": info.get("privacy"), "released_pool": info.get("released_pool"),
        "per_ipc": per_ipc, "full_real": full, "baselines_reused": reused_baselines(per_ipc, full),
        "device": device_name(device), "checkpoints": info["checkpoints"], "config": to_jsonable(cfg),
    }


def reused_baselines(per_ipc: list[dict], full: dict | None) -> list[str]:
    """The baseline arms this run reused from an earlier identical one (server/distill/baseline_cache.py)."""
    names = [f"random_real ipc{r['ipc']}" for r in per_ipc if "cached" in r.get("random_real", {})]
    names += [f"random_real ipc{r['ipc']} seed +{s}" for r in per_ipc
              for s in (r.get("over_seeds") or {}).get("random_real_reused", []) if s]
    return names + (["full_real"] if full and "cached" in full else [])


def format_over_seeds(o: dict) -> str:
    """One line: each arm's mean ± std over the seeds, then the paired lead ± its standard error."""
    text = f"over {len(o['seed_offsets'])} seeds: synthetic {o['mean_synthetic']:.4f} ± {o['std_synthetic']:.4f}"
    if "lead" in o:
        text += (f", random real {o['mean_random_real']:.4f} ± {o['std_random_real']:.4f} (mean ± std); paired lead "
                 f"{100 * o['lead']:+.2f} ± {100 * o['lead_se']:.2f}pt (± SE), wins {o['wins']} of {o['seeds']}")
    return text


def protocol_line(report: dict) -> str:
    """How the arms were scored, in words."""
    if report.get("protocol") == "standard":
        e = report["evaluation"]
        return (f"protocol: standard (ConvNet-3 from scratch on each set alone, {e['epochs']} epochs, {e['labels']} "
                f"labels, DSA, full test set; {e['evaluators']} evaluator(s) per set); recipe {report.get('recipe')}")
    return (f"protocol: teacher-kd (every arm's student distils from the server's teacher: {report['student_loss']}); "
            f"recipe {report.get('recipe')}")


def format_table(report: dict) -> str:
    lines = [protocol_line(report), f"{'IPC':>4} {'images':>7} {'synthetic':>10} {'random real':>12} {'lead':>8}  condense",
             "-" * 57]
    for r in report["per_ipc"]:
        syn, rr = r["synthetic"]["accuracy"], r.get("random_real", {}).get("accuracy")
        lead = "" if rr is None else f"{100 * (syn - rr):+.2f}pt"
        lines.append(f"{r['ipc']:>4} {r['synthetic_images']:>7} {syn:>10.4f} "
                     f"{'-' if rr is None else format(rr, '.4f'):>12} {lead:>8}  {r['seconds_condense']:.1f}s")
        if "over_seeds" in r:
            lines.append("     " + format_over_seeds(r["over_seeds"]))
    if report.get("full_real"):
        lines.append(f"full real ({report['real_images_available']} images): {report['full_real']['accuracy']:.4f}")
    if report.get("baselines_reused"):
        lines.append(f"reused from an identical earlier run (same data, recipe, teacher, code, kernels; "
                     f"--retrain-baselines retrains): {', '.join(report['baselines_reused'])}")
    if report.get("teacher"):
        t = report["teacher"]
        lines.append(f"teacher (E1 -> E2 -> head, {t['steps']} steps on the pool): {t['accuracy']:.4f}")
    if report.get("committed_checkpoints"):
        lines.append("models: the committed checkpoints of recipe 'full' (" + ", ".join(report["committed_checkpoints"])
                     + "; shared/checkpoints/full/manifest.json)")
    s = report["seconds"]
    moved = f"encode {s['encode']:.1f}" if s.get("encode") is not None else f"collect {s['collect']:.1f}"
    extra = f", over seeds {s['over_seeds']:.0f}" if s.get("over_seeds") else ""
    lines.append(f"seconds: pretrain {s['pretrain']:.0f}, {moved}, condense {s['condense']:.1f}, "
                 f"student {s['student']:.0f}{extra}  | {report['mode']} | device {report['device']}")
    if report.get("privacy"):
        p = report["privacy"]
        lines.append("privacy: NO differential privacy (epsilon = inf); latents and labels sealed in transit only"
                     if p["mechanism"] == "none" else
                     f"privacy: epsilon={p['epsilon']:.3g}, delta={p['delta']:.2g} per record, covering "
                     f"{p['covers']} ({p['neighbouring']})" + (f"\n{p['note']}" if p.get("note") else ""))
    fed = report.get("federation")
    if fed:
        lines.append(f"federation: {len(fed['accepted_nodes'])}/{len(fed['nodes'])} nodes accepted, "
                     f"{len(fed['dropped_nodes'])} dropped, {len(fed['rejections'])} rejections, "
                     f"{fed['bytes_received'] / 1e6:.1f} MB received")
    return "\n".join(lines)
