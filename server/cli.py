"""fedcondense: federated, privacy-audited dataset condensation. Devices send sealed latents; the server
condenses them with a chain of conditional noise estimators; every arm is scored under a named protocol.
Guides: README.md, docs/ (method, privacy, results, this reference), deploy/README.md."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from server.options import (add_common, add_condense, add_demo_arguments, add_student,  # noqa: E402
                            add_teacher, demo_config)


def cmd_demo(args) -> int:
    from server.pipeline import format_table, run_demo
    cfg = demo_config(args)
    if cfg.federation is None:
        report = run_demo(cfg, Path(args.out))
    else:
        from server.federation.app import run_simulation_demo
        report = run_simulation_demo(cfg, Path(args.out))
    print(format_table(report))
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0


def cmd_pretrain(args) -> int:
    from server.pipeline import build_models
    from shared.data import load_dataset
    from shared.device import resolve_device
    cfg = demo_config(args)
    ds = load_dataset(cfg.data)
    if args.what == "autoencoder":
        from server.condense.pretrain import load_or_train_autoencoder
        *_, info = load_or_train_autoencoder(ds.public.images, cfg.autoencoder, resolve_device(cfg.device))
    else:
        *_, info = build_models(ds, cfg, resolve_device(cfg.device))
    print(json.dumps(info, indent=2))
    return 0


def cmd_condense(args) -> int:
    from server.condense.chain import condense
    from server.pipeline import build_models
    from shared.data import load_dataset
    from shared.device import resolve_device
    from shared.workers import join_workers, world
    join_workers()
    cfg = demo_config(args)
    if args.ratio is None and not args.max_coverage:
        cfg = replace(cfg, condense=replace(cfg.condense, ipc=args.ipc[0] if args.ipc else cfg.condense.ipc))
    device = resolve_device(cfg.device)
    ds = load_dataset(cfg.data)
    models, pool, _ = build_models(ds, cfg, device)
    if cfg.condense.guidance:
        from server.distill.teacher import load_or_train_teacher
        models["teacher"], _ = load_or_train_teacher(models, pool.images, pool.labels, ds.num_classes, device,
                                                     cfg.student.teacher_steps)
    out = Path(args.out)
    syn = condense(pool.images, pool.labels, pool.ids, ds.num_classes, models, cfg.chain, cfg.condense, device,
                   work=out / ".batches")
    if world()[0] != 0:                         # torchrun: rank 0 refines and saves
        return 0
    syn.save(out, ds.class_names)
    shutil.rmtree(out / ".batches", ignore_errors=True)
    print(f"{len(syn)} synthetic images from {syn.meta['real_latents_used']} real latents in "
          f"{syn.meta['seconds']:.1f}s ({len(syn) / syn.meta['seconds']:.1f} images/s) -> {args.out}")
    return 0


def cmd_student(args) -> int:
    from server.condense.chain import SyntheticSet
    from shared.data import load_dataset
    from shared.device import resolve_device
    from shared.workers import join_workers, world
    join_workers()                              # torchrun: the teacher-KD student's batches shared out
    cfg = demo_config(args)
    syn = SyntheticSet.load(Path(args.synthetic))
    ds = load_dataset(cfg.data)
    device = resolve_device(cfg.device)
    work = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    if args.protocol == "standard":
        from server.distill.evaluate import LabelledSet, evaluate_sets
        from shared.config import EvaluationConfig, override
        ecfg = override(EvaluationConfig(), epochs=args.epochs, evaluators=args.evaluators, labels=args.labels)
        result = evaluate_sets([LabelledSet("synthetic", syn.images, syn.labels, syn.meta.get("formation", 1))],
                               ds.test, ecfg, device, work)
    else:
        from server.condense.formation import expand
        from server.distill.losses import needs_teacher
        from server.distill.student import fit_and_score
        loss = args.loss or cfg.student.loss
        teacher = server_teacher_for(ds, cfg, device) if needs_teacher(loss) else None
        images, labels = expand(syn.images, syn.labels, syn.meta.get("formation", 1))
        result = fit_and_score(images, labels, ds.test, cfg.student, device, loss=loss, teacher=teacher,
                               checkpoint=work / "student.pt" if work else None)
        result.update(protocol="teacher-kd" if teacher is not None else "soft labels, no teacher", loss=loss)
    if world()[0] == 0:
        print(json.dumps(result, indent=2))
    return 0


def server_teacher_for(ds, cfg, device):
    """The server's teacher (trained on the pooled latents of the private split, or loaded from the cache)."""
    from server.distill.teacher import load_or_train_teacher
    from server.pipeline import build_models
    models, pool, _ = build_models(ds, cfg, device)
    return load_or_train_teacher(models, pool.images, pool.labels, ds.num_classes, device, cfg.student.teacher_steps)[0]


def cmd_distill(args) -> int:
    from server.condense.chain import SyntheticSet
    from server.distill.suite import markdown_table, run_distill, write_outputs
    from server.distill.teacher import load_or_train_teacher
    from server.pipeline import build_models
    from server.distill.student import evaluate
    from shared.data import load_dataset
    from shared.device import resolve_device
    cfg = demo_config(args)
    device = resolve_device(cfg.device)
    ds = load_dataset(cfg.data)
    syn = SyntheticSet.load(Path(args.synthetic))
    models, pool, _ = build_models(ds, cfg, device)
    teacher, info = load_or_train_teacher(models, pool.images, pool.labels, ds.num_classes, device,
                                          cfg.student.teacher_steps)
    result = run_distill(syn, teacher, ds.test, cfg, args.loss, args.seeds, device)
    result["teacher"] = {"accuracy": evaluate(teacher, ds.test.images, ds.test.labels, device), **info}
    write_outputs(result, Path(args.out))
    print(markdown_table(result))
    return 0


def cmd_audit(args) -> int:
    from server.audit.runner import run_audit
    from shared.device import resolve_device
    result = run_audit(Path(args.run_dir), resolve_device(args.device), args.shadows, args.candidates,
                       args.inverter_steps, [Path(p) for p in args.compare], args.lira)
    mia = result["membership"]
    print(f"membership AUC: loss-threshold {mia['loss_threshold']['auc']:.3f}"
          + "".join(f", LiRA {mode} {mia['lira_' + mode]['auc']:.3f}" for mode in ("offline", "online")
                    if f"lira_{mode}" in mia))
    for name, v in result["inversion"]["settings"].items():
        print(f"inversion {name}: PSNR {v['psnr_db']:.2f} dB, SSIM {v['ssim']:.3f}")
    print(f"verdict ({result['verdict']['status']}): {result['verdict']['text']}")
    print(f"audit: {Path(args.run_dir) / 'audit' / 'audit.html'}")
    return 0


def _benchmarks():
    """The harness lives in the checkout's benchmarks/ (a development tool, not an installed package)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "harness.py").exists():
        raise FileNotFoundError("`bench` runs from a source checkout (benchmarks/harness.py not found)")
    sys.path.insert(0, str(root))
    from benchmarks import harness
    return harness


SCALES = {  # bench presets: smoke (tests), demo (a CPU in ~1 h), full
    "smoke": dict(ipcs=(1,), seeds=(0,), arms=("ours", "random_real", "dm", "full_real"), dm_iterations=3,
                  full_steps=10, scaling_sizes=(200, 500), speed_images=100),
    "demo": dict(ipcs=(1, 10, 50), seeds=(0,), arms=("ours", "random_real", "dm", "full_real"),
                 dm_iterations=200, full_steps=100, scaling_sizes=(1000, 5000, 20000)),
    "full": dict(),
}


STANDARD_SCALES = {  # the standard-protocol bench: smoke (tests), demo (a CPU in ~1 h), full (a GPU)
    "smoke": dict(ipcs=(2,), seeds=(0,), epochs=(2,), long_ipcs=(), evaluators=1, dm_iterations=2, dm_ipcs=(2,),
                  refine_iterations=2, full_epochs=1, max_coverage=False),
    "demo": dict(ipcs=(10,), seeds=(0,), epochs=(300,), long_ipcs=(), evaluators=1, dm_iterations=200,
                 refine_iterations=100, full_epochs=1, max_coverage=False,
                 arms=("ours_patent", "ours", "random_real", "dm")),
    "full": dict(),
}


def cmd_bench_standard(args, harness) -> int:
    from benchmarks.standard import StandardBenchConfig, run_standard_bench
    from benchmarks.standard_report import markdown
    base = demo_config(args)
    preset = dict(STANDARD_SCALES[args.scale])
    for key, value in (("ipcs", args.ipc), ("seeds", args.seeds), ("arms", args.arms)):
        if value:
            preset[key] = tuple(value)
    for key in ("dm_iterations", "evaluators", "budget_s", "refine_iterations"):
        if getattr(args, key, None) is not None:
            preset[key] = getattr(args, key)
    if args.epochs:
        preset["epochs"] = tuple(args.epochs)
    if args.bench_max_coverage is not None:     # its own dest: the condensation budget of the IPC arms stays an IPC
        preset["max_coverage"] = bool(args.bench_max_coverage)
    if args.full_epochs is not None:
        preset["full_epochs"] = int(args.full_epochs)
    if args.max_coverage_arms:
        preset["max_coverage_arms"] = tuple(args.max_coverage_arms)
    cfg = StandardBenchConfig(data=base.data, autoencoder=base.autoencoder, chain=base.chain, condense=base.condense,
                              student=base.student, recipe=args.recipe, device=base.device, **preset)
    path = run_standard_bench(cfg, Path(args.out))
    print(markdown(json.loads(path.read_text())))
    print(f"results: {path} (+ .md, .png)")
    return 0


def cmd_bench_federation(args) -> int:
    from benchmarks.federation import FederationBenchConfig, markdown, run_federation_bench, update_doc
    cfg = FederationBenchConfig(**{k: tuple(v) for k, v in (("clients", args.clients), ("splits", args.splits)) if v},
                                **({"train_limit": args.train_limit} if args.train_limit else {}))
    path = run_federation_bench(cfg, Path(args.out))
    doc = json.loads(path.read_text())
    print(markdown(doc))
    if args.doc:
        update_doc(doc, Path(args.doc))
    print(f"results: {path} (+ {path.with_suffix('.png').name})")
    return 0


def cmd_bench_privacy(args) -> int:
    from benchmarks.privacy_curve import PrivacyCurveConfig, markdown, plot, run_privacy_curve
    preset = {k: tuple(v) for k, v in (("epsilons", args.epsilons), ("group_sizes", args.group_sizes),
                                        ("seeds", args.seeds), ("central_arms", args.central_arms),
                                        ("dp_sgd_seeds", args.dp_sgd_seeds)) if v}
    preset.update({k: getattr(args, k) for k in ("evaluators", "budget_s", "threat_model")
                   if getattr(args, k, None) is not None})
    if args.ipc:
        preset["ipc"] = args.ipc[0]
    if args.epochs:
        preset["epochs"] = args.epochs[0]
    if args.with_teacher_kd:
        preset["teacher_kd"] = True
    if args.skip_unnoised:
        preset["unnoised"] = False
    demo = demo_config(args)
    from shared.config import override
    demo = replace(demo, central=override(demo.central, iterations=args.central_iterations))
    cfg = PrivacyCurveConfig(demo=demo, **preset,
                             **({"label_mechanism": args.label_mechanism} if getattr(args, "label_mechanism", None) else {}))
    path = run_privacy_curve(cfg, Path(args.out))
    doc = json.loads(path.read_text())
    plot(doc, path.with_suffix(".png"))
    print(markdown(doc))
    print(f"results: {path} (+ {path.with_suffix('.png').name})")
    return 0


def cmd_bench_distill_native(args) -> int:
    from benchmarks.distill_native import NativeDistillConfig, markdown, run_native_distill
    preset = {k: tuple(v) for k, v in (("seeds", args.seeds), ("students", args.students),
                                        ("methods", args.methods)) if v}
    preset.update({k: getattr(args, k) for k in ("per_class", "native_steps", "light_lr")
                   if getattr(args, k, None) is not None})
    if "native_steps" in preset:
        preset["steps"] = preset.pop("native_steps")
    cfg = NativeDistillConfig(data=demo_config(args).data, device=args.device, **preset)
    path = run_native_distill(cfg, Path(args.out))
    print(markdown(json.loads(path.read_text())))
    print(f"results: {path} (+ .md, .png)")
    return 0


def cmd_bench_distill_synthetic(args) -> int:
    from benchmarks.distill_synthetic import SyntheticDistillConfig, markdown, run_synthetic_distill
    from benchmarks.standard import StandardBenchConfig
    base = demo_config(args)
    bench = StandardBenchConfig(data=base.data, autoencoder=base.autoencoder, chain=base.chain, condense=base.condense,
                                student=base.student, recipe=args.recipe, device=base.device,
                                refine_iterations=base.condense.refine_iterations, refine_lr=base.condense.refine_lr)
    preset = {k: tuple(v) for k, v in (("seeds", args.seeds), ("methods", args.methods), ("students", args.students))
              if v}
    if args.ipc:
        preset["ipc"] = args.ipc[0]
    path = run_synthetic_distill(SyntheticDistillConfig(bench=bench, **preset), Path(args.out))
    print(markdown(json.loads(path.read_text())))
    print(f"results: {path} (+ .md, .png)")
    return 0


def cmd_bench(args) -> int:
    harness = _benchmarks()
    if args.distill_native:
        return cmd_bench_distill_native(args)
    if args.distill_synthetic:
        return cmd_bench_distill_synthetic(args)
    if args.federation:
        return cmd_bench_federation(args)
    if args.privacy_curve:
        return cmd_bench_privacy(args)
    if args.protocol == "standard":
        return cmd_bench_standard(args, harness)
    base = demo_config(args)
    preset = dict(SCALES[args.scale])
    if args.ipc:
        preset["ipcs"] = tuple(args.ipc)
    if args.seeds:
        preset["seeds"] = tuple(args.seeds)
    if args.arms:
        preset["arms"] = tuple(args.arms)
    for key in ("dm_iterations", "full_steps", "scaling_T"):
        if getattr(args, key) is not None:
            preset[key] = tuple(getattr(args, key)) if key == "scaling_T" else getattr(args, key)
    cfg = harness.BenchConfig(data=base.data, autoencoder=base.autoencoder, chain=base.chain, student=base.student,
                              device=base.device, **preset)
    path = harness.run_bench(cfg, Path(args.out))
    doc = json.loads(path.read_text())
    print(harness.markdown_table(doc))
    print(f"results: {path} (+ {path.with_suffix('.png').name})")
    return 0


def cmd_bench_table(args) -> int:
    """One JSON, or several runs of one machine merged (`--merged-out` keeps the merged JSON + PNG)."""
    harness = _benchmarks()
    if len(args.results) > 1 and not args.merged_out:
        raise ValueError("several results files: name the merged JSON with --merged-out")
    docs = [{"source": Path(p).name, **json.loads(Path(p).read_text())} for p in args.results]
    doc = harness.merge_runs(docs) if len(docs) > 1 else docs[0]
    path = Path(args.merged_out or args.results[0])
    if args.merged_out:
        path.write_text(json.dumps(doc, indent=2))
    png = path.with_suffix(".png")
    if args.merged_out or not png.exists():
        harness.plot(doc, png.with_suffix(""))
    if args.readme:
        harness.update_readme(doc, Path(args.readme))
    print(harness.markdown_table(doc))
    return 0


def cmd_results_table(args) -> int:
    """The README's results table from benchmarks/results/*.json."""
    _benchmarks()
    from benchmarks.results_table import render, update_readme
    paths = [Path(p) for p in args.results] or sorted(Path(args.folder).glob("*.json"))
    table = render(paths)
    if args.readme:
        update_readme(Path(args.readme), table)
    print(table)
    return 0


def cli_reference() -> str:
    """docs/cli.md: every command's help, from the parser itself."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    os.environ["COLUMNS"] = "110"
    parts = ["# Command-line reference", "",
             "Generated from the parser by `fedcondense cli-reference > docs/cli.md`; a test checks that it matches.", "",
             "```", parser.format_help().rstrip(), "```"]
    for name, p in sub.choices.items():
        parts += ["", f"## `fedcondense {name}`", "", "```", p.format_help().rstrip(), "```"]
    return "\n".join(parts) + "\n"


def cmd_cli_reference(args) -> int:
    print(cli_reference(), end="")
    return 0


def cmd_losses(args) -> int:
    """Every registered loss with one line: what it is and its source."""
    from server.distill.losses import LOSSES
    for name in LOSSES.names():
        doc = (LOSSES[name].__doc__ or "").strip().split("\n")[0]
        print(f"{name:16s} {doc}")
        if getattr(LOSSES[name], "caveat", None):
            print(f"{'':16s} ! {LOSSES[name].caveat.format(name=name)}")
    print("\ncompose by weight: --loss soft_ce:1,kd:0.5 (`fedcondense distill`, `demo --student-loss`)")
    return 0


def cmd_certs(args) -> int:
    from server.federation.certs import make_certificates
    paths = make_certificates(Path(args.out), args.host, args.nodes, args.days)
    print(json.dumps(paths, indent=2))
    return 0


def cmd_checkpoints(args) -> int:
    from server.condense.export import export
    cfg = demo_config(args)
    out = export(Path(args.cache), args.name, args.recipe, cfg.data, cfg.autoencoder, cfg.chain, cfg.student.teacher_steps,
                 args.rebuild, args.trained_on)
    print(f"committed checkpoints: {out} (manifest.json)")
    return 0


def cmd_gateway(args) -> int:
    from server.federation.gateway import serve
    serve(args.listen, args.superlink, args.ssl_certfile, args.ssl_keyfile, args.ca)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedcondense", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-v) or everything (-vv)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="whole pipeline at demo scale; writes OUT/report.json")
    add_demo_arguments(p)
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("pretrain", help="train (or load cached) models")
    p.add_argument("what", choices=["autoencoder", "chain"])
    add_common(p)
    p.set_defaults(fn=cmd_pretrain)
    p = sub.add_parser("condense", help="make a synthetic set from the private split")
    p.add_argument("--out", required=True)
    p.add_argument("--ipc", type=int, nargs=1, default=None)
    p.add_argument("--teacher-steps", type=int, default=None, help="steps of the teacher that guides sampling")
    add_common(p)
    add_condense(p)
    p.set_defaults(fn=cmd_condense)
    p = sub.add_parser("student", help="train a student on a synthetic set, report test accuracy")
    p.add_argument("--synthetic", required=True, help="directory written by `condense`")
    p.add_argument("--protocol", choices=["standard", "teacher-kd"], default="standard",
                   help="standard: ConvNet-3 evaluators from scratch on the set alone (DC/DSA/DM/IDC protocol); "
                        "teacher-kd: the demo's student recipe with --loss")
    p.add_argument("--epochs", type=int, default=None, help="standard: evaluator epochs (default 300)")
    p.add_argument("--evaluators", type=int, default=None, help="standard: evaluator seeds (default 5)")
    p.add_argument("--labels", choices=["hard", "soft"], default=None, help="standard: argmax or the set's own labels")
    p.add_argument("--loss", default=None, help="teacher-kd: the student's loss spec (default: the recipe's, "
                                                 "e.g. soft_ce:0.25,kd:1; a term but soft_ce distils from the teacher)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="keep the training state here every minute; the same command started again resumes it "
                        "and trains the same model, bit for bit")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher-kd: steps of the server's teacher")
    add_common(p)
    add_student(p)
    p.set_defaults(fn=cmd_student)
    p = sub.add_parser("distill", help="students on a synthetic set for each loss (x seeds), with the server's teacher")
    p.add_argument("--synthetic", required=True, help="directory written by `condense` or `demo` (e.g. runs/demo/ipc10)")
    p.add_argument("--loss", nargs="+", default=["soft_ce"],
                   help="loss specs, e.g. soft_ce kd dkd soft_ce:1,kd:1; `fedcondense losses` lists every loss: soft_ce, "
                        "kd, dkd, mi_prior, ddkd, attention, mixed, channel_sparse, channel_random, channel_maxpool")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher training steps (default: StudentConfig)")
    p.add_argument("--out", default="runs/distill")
    add_common(p)
    add_student(p)
    p.set_defaults(fn=cmd_distill)
    p = sub.add_parser("audit", help="privacy audit of a run: membership inference, inversion, memorisation")
    p.add_argument("run_dir")
    p.add_argument("--shadows", type=int, default=4, help="LiRA shadows (0: loss-threshold only)")
    p.add_argument("--lira", default="offline", choices=("offline", "online"),
                   help="offline: OUT shadows without the candidate members; online (central-DP runs): each shadow "
                        "holds a random half of all candidates, so each is judged against itself IN and OUT")
    p.add_argument("--candidates", type=int, default=500, help="members (and as many non-members) attacked")
    p.add_argument("--inverter-steps", type=int, default=300)
    p.add_argument("--compare", nargs="*", default=[], help="other runs (e.g. other epsilons) for the utility curve")
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=cmd_audit)
    p = sub.add_parser("bench", help="ours vs random real, DM and full data in one run; JSON + plots")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--scale", choices=sorted(SCALES), default="demo")
    p.add_argument("--ipc", type=int, nargs="+", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--arms", nargs="+", default=None,
                   help="subset of: ours ours_t10 ours_random ours_one_to_one ours_cluster ours_shared random_real dm full_real")
    p.add_argument("--dm-iterations", type=int, default=None, help="DM optimisation steps (default: the scale's)")
    p.add_argument("--full-steps", type=int, default=None, help="student steps of the full-data arm (default: the scale's)")
    p.add_argument("--scaling-T", type=int, nargs="+", default=None,
                   help="extra chain lengths T to train for the time-vs-T curve (one chain each)")
    p.add_argument("--protocol", choices=["teacher-kd", "standard"], default="teacher-kd",
                   help="standard: ConvNet-3 from scratch on each set alone, the field's protocol "
                        "(benchmarks/standard.py); teacher-kd: every arm distils from the server's teacher")
    p.add_argument("--epochs", type=int, nargs="+", default=None, help="standard protocol: evaluator epochs")
    p.add_argument("--evaluators", type=int, default=None, help="standard protocol: evaluators per set")
    p.add_argument("--refine-iterations", type=int, default=None, help="standard protocol: refined arms' iterations")
    p.add_argument("--max-coverage", action=argparse.BooleanOptionalAction, default=None, dest="bench_max_coverage",
                   help="standard protocol: also condense and score the max-coverage set, every private latent "
                        "once (default: on at --scale full, off below; ~70 min on 2 CPU cores)")
    p.add_argument("--max-coverage-arms", nargs="+", default=None,
                   choices=["max_coverage", "max_coverage_patent", "max_coverage_random_real"],
                   help="standard protocol, --max-coverage: which max-coverage sets to score (default max_coverage: "
                        "the recipe's condensation; _patent: the gradient-free chain; _random_real: as many real "
                        "images per class)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="standard protocol: stop starting work after this many seconds (what is cut is listed)")
    p.add_argument("--federation", action="store_true",
                   help="the collection's cost against the number of devices instead (benchmarks/federation.py): "
                        "wall time, server and worker peak RSS, bytes on the wire")
    p.add_argument("--clients", type=int, nargs="+", default=None,
                   help="--federation: simulated clients of each collection (default 10 100 1000)")
    p.add_argument("--splits", nargs="+", choices=["dirichlet", "iid"], default=None,
                   help="--federation: how the private split is cut (default: dirichlet iid)")
    p.add_argument("--doc", default=None, help="--federation: rewrite the table between the federation-bench "
                                               "markers of this page (docs/scale.md)")
    p.add_argument("--privacy-curve", action="store_true",
                   help="the released set's accuracy (standard protocol) against epsilon, local or central DP "
                        "(benchmarks/privacy_curve.py)")
    p.add_argument("--epsilons", type=float, nargs="+", default=None,
                   help="--privacy-curve: per-record epsilons (default 0.5 1 3 8 10; delta 1e-5)")
    p.add_argument("--group-sizes", type=int, nargs="+", default=None,
                   help="--privacy-curve: device group sizes k (default 1 16)")
    p.add_argument("--threat-model", choices=["local", "central"], default=None,
                   help="--privacy-curve: 'local' (default; curious server, DP on the device) or 'central' (trusted "
                        "server, untrusted consumers: one Gaussian release of the pool's class-mean embeddings, "
                        "server/condense/private_target.py)")
    p.add_argument("--central-iterations", type=int, default=None,
                   help="--privacy-curve --threat-model central: Adam iterations fitting the set to the release "
                        "(default 150)")
    p.add_argument("--central-arms", nargs="+", choices=["ours", "dp_merf", "dp_sgd"], default=None,
                   help="--privacy-curve --threat-model central: what runs at each epsilon (default all): ours (the "
                        "release and the fit), dp_merf (DP-MERF sampled at the same IPC, benchmarks/dp_merf.py), "
                        "dp_sgd (DP-SGD with Opacus on the private images, Tramer & Boneh's CNN, benchmarks/dp_sgd.py)")
    p.add_argument("--dp-sgd-seeds", type=int, nargs="+", default=None,
                   help="--privacy-curve --threat-model central: DP-SGD models per epsilon (default 0; ~10 min each "
                        "on 2 CPU cores at the published 40 epochs)")
    p.add_argument("--skip-unnoised", action="store_true",
                   help="--privacy-curve --threat-model central: leave out the reference fit to the un-noised "
                        "statistic (epsilon inf, no guarantee): one fit and one evaluation less per seed")
    p.add_argument("--with-teacher-kd", action="store_true",
                   help="--privacy-curve --threat-model central: also score every set by the teacher-KD student, "
                        "distilling from the teacher trained on the public split (post-processing of the release)")
    p.add_argument("--distill-native", action="store_true",
                   help="every distillation loss in its native setting (benchmarks/distill_native.py): a teacher on "
                        "all training images, small students on a real subset, paired seeds against vanilla KD")
    p.add_argument("--distill-synthetic", action="store_true",
                   help="every distillation loss on the condensed set (benchmarks/distill_synthetic.py): the "
                        "teacher-KD student with the server's teacher, paired seeds against soft labels and KD")
    p.add_argument("--students", nargs="+", default=None, help="--distill-native: student networks (default convnet3_w32); --distill-synthetic: "
                        "(default convnet3 convnet3_w32)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="--distill-native / --distill-synthetic: methods (default all: ce kd dkd ddkd mi_prior "
                        "attention mixed channel_*, and each feature term added to KD: NAME+kd)")
    p.add_argument("--per-class", type=int, default=None, help="--distill-native: real images per class (default 100)")
    p.add_argument("--native-steps", type=int, default=None, help="--distill-native: student steps (default 400)")
    p.add_argument("--light-lr", type=float, default=None,
                   help="--distill-native: learning rate of the ShuffleNet and MobileNet students (default 0.01, "
                        "mdistiller's; the other students train at 0.05)")
    add_common(p)
    add_student(p)
    add_teacher(p)
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("bench-table", help="render the README results table from a bench JSON")
    p.add_argument("results", nargs="+", help="bench JSON(s); several are merged (same machine and recipe)")
    p.add_argument("--merged-out", default=None, help="where to write the merged JSON (its PNG goes beside it)")
    p.add_argument("--readme", default=None, help="rewrite the table between the bench markers of this file")
    p.set_defaults(fn=cmd_bench_table)
    p = sub.add_parser("losses", help="list every registered student loss (use them in --loss / --student-loss)")
    p.set_defaults(fn=cmd_losses)
    p = sub.add_parser("cli-reference", help="print docs/cli.md (every command's help, from this parser)")
    p.set_defaults(fn=cmd_cli_reference)
    p = sub.add_parser("results-table", help="the README's results table, generated from the result JSON files")
    p.add_argument("results", nargs="*", help="result JSON files (default: every *.json in --folder)")
    p.add_argument("--folder", default="benchmarks/results")
    p.add_argument("--readme", default=None, help="rewrite the table between the results markers of this file")
    p.set_defaults(fn=cmd_results_table)
    p = sub.add_parser("certs", help="CA, SuperLink certificate (with SANs) and SuperNode key pairs")
    p.add_argument("--out", default="deploy/certs")
    p.add_argument("--host", nargs="+", default=["localhost", "127.0.0.1"], help="SANs: DNS names and IPs of the SuperLink")
    p.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs to make")
    p.add_argument("--days", type=int, default=365)
    p.set_defaults(fn=cmd_certs)
    p = sub.add_parser("checkpoints", help="copy a recipe's trained models from a cache folder into "
                                           "shared/checkpoints/NAME with a manifest (hashes, how to rebuild)")
    p.add_argument("--cache", required=True, help="a FEDCONDENSE_CACHE folder holding the recipe's entries")
    p.add_argument("--name", default="full")
    p.add_argument("--trained-on", default="", help="the machine and software that trained them")
    p.add_argument("--rebuild", default="benchmarks/gpu_standard.sh OUT DATA_DIR, then fedcondense checkpoints "
                                        "--cache <its FEDCONDENSE_CACHE> --recipe full --name full")
    add_common(p)
    add_teacher(p)
    p.set_defaults(fn=cmd_checkpoints)
    p = sub.add_parser("gateway", help="the deployment's public port: forwards the Fleet API alone to a SuperLink "
                                       "bound to 127.0.0.1 (deploy/README.md)")
    p.add_argument("--listen", default="0.0.0.0:9092", help="HOST:PORT the SuperNodes connect to")
    p.add_argument("--superlink", default="https://127.0.0.1:9093", help="the SuperLink's loopback URL")
    p.add_argument("--ssl-certfile", required=True, help="certificate the SuperNodes verify (server.pem)")
    p.add_argument("--ssl-keyfile", required=True, help="its private key (server.key)")
    p.add_argument("--ca", default=None, help="CA that verifies the SuperLink's certificate (ca.crt)")
    p.set_defaults(fn=cmd_gateway)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from shared.device import CPU_PRECISION_ENV, keep_freed_memory
    keep_freed_memory()
    if getattr(args, "cpu_precision", None):
        os.environ[CPU_PRECISION_ENV] = args.cpu_precision       # env: reaches Flower's app processes too
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        print(f"fedcondense {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
