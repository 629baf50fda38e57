"""Flower ServerApp: pretrain E1/D on the public split, collect sealed latents, condense, report.

`app` is the component `flwr run` loads (config from `[tool.flwr.app.config]` / `--run-config`);
`run_simulation_demo` runs the same body in Flower's simulation engine (the embedded default).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation.collect import collect
from server.federation.ledger import build_ledger, write_ledger
from server.pipeline import canonical_pool, condense_and_evaluate, prepare_server
from server.federation.pool import LatentPool
from shared.accounting import ImageRelease, calibrate, default_delta
from shared.config import DemoConfig, FederationConfig
from shared.data import ImageSplit
from shared.durable import run_lock, write_json

log = logging.getLogger("fedcondense.server")


def run_federated(grid: Grid, cfg: DemoConfig, out: Path) -> dict:
    out, device, ds, e1, dec, ae = prepare_server(cfg, out)
    release = requested_release(cfg, e1, ds)
    pool = LatentPool(out / "pool")
    fed = collect(grid, e1.cpu(), cfg.data, cfg.federation, release, pool, ds.num_classes, ds.native_shape)
    e1.to(device)
    for entry in pool.provenance():      # nodes an earlier, interrupted run of this folder committed
        fed["clients"].setdefault(str(entry["node_id"]), {k: entry.get(k) for k in
                                                          ("ciphertext_bytes", "latents", "chunks", "mechanism")})
    arrived = canonical_pool(ImageSplit(*pool.load()))
    pooled_bytes = sum(entry.get("ciphertext_bytes", 0) for entry in pool.provenance())    # resumed nodes too
    fed["uplink_bytes_per_image"] = pooled_bytes / max(len(arrived), 1)
    fed["raw_bytes_per_image"] = ds.raw_bytes_per_image
    ledger = build_ledger(cfg, fed, list(arrived.images.shape[1:]), release)
    write_ledger(out, ledger)
    info = {"mode": "federated", "pretrain": ae["seconds"], "federation": fed, "privacy": ledger["summary"],
            "autoencoder": ae, "checkpoints": {"autoencoder": ae["path"]}}
    fed["id_scheme"] = "rank * 10**7 + position; rank = place of the node id among the pooled nodes, ascending"
    return condense_and_evaluate(ds, cfg, e1, dec, arrived, info, out, device, release)


def requested_release(cfg: DemoConfig, e1, ds) -> ImageRelease:
    """What the server asks every device to release per record (docs/privacy.md). `--target-epsilon`
    calibrates clip C, latent noise and randomized-response labels; C defaults to the median latent
    norm on the server's public split (no privacy cost). Without a target: no noise, labels as they are."""
    fed = cfg.federation
    if not fed.target_epsilon:
        if fed.noise_multiplier > 0 and fed.clip_norm > 0:
            return ImageRelease(fed.clip_norm, fed.noise_multiplier, fed.delta or default_delta(len(ds.private)),
                                "public", None, ds.num_classes)
        return ImageRelease(0.0, 0.0, 0.0, "public", None, ds.num_classes)
    from client.encode import encode_images
    delta = fed.delta or default_delta(len(ds.private))
    clip = fed.clip_norm or float(encode_images(e1, ds.public.images[:2000]).flatten(1).norm(dim=1).median())
    release = calibrate(fed.target_epsilon, delta, label_mechanism=fed.label_mechanism, label_share=fed.label_share,
                        num_classes=ds.num_classes, clip_norm=clip, group_size=fed.group_size)
    log.info("DP: target epsilon %.3g, delta %.2g -> clip %.3g, noise multiplier %.4g, group size %d, labels %s "
             "(epsilon %s)", fed.target_epsilon, delta, clip, release.noise_multiplier, fed.group_size,
             release.label_mechanism, release.label_epsilon)
    return release


def config_from_run_config(run_config: dict) -> tuple[DemoConfig, Path]:
    """Map `[tool.flwr.app.config]` keys onto the typed config (unknown keys are an error)."""
    known = {"out", "clients", "alpha", "iid", "ipc", "T", "layout", "device", "train-limit", "test-limit",
             "ae-steps", "chain-steps", "chain-batch", "module-steps", "student-steps", "full-epochs", "timeout",
             "chunk-size", "no-full", "target-epsilon", "delta", "clip-norm", "student", "student-loss", "prediction",
             "teacher-steps", "guidance", "guidance-terms", "guidance-steps", "retrain-baselines", "label-mechanism",
             "label-share", "deadline", "retries", "condense-batch", "group-size", "denoise"}
    unknown = set(run_config) - known
    if unknown:
        raise ValueError(f"unknown run-config keys {sorted(unknown)}; known: {sorted(known)}")
    from server.options import demo_config, demo_parser
    argv = ["--out", str(run_config.get("out", "runs/federated"))]
    for key, value in run_config.items():
        if key == "out" or _means_typed_default(key, value):
            continue
        if isinstance(value, bool):
            argv += [f"--{key}"] if value else []
        else:
            argv += [f"--{key}", str(value)]
    args = demo_parser().parse_args(argv)
    return demo_config(args), Path(args.out)


# 0 turns guidance off / guides every step there, so -1 stands for "the typed default"
ZERO_IS_A_SETTING = {"guidance", "guidance-steps", "retries"}


def _means_typed_default(key: str, value) -> bool:
    """0 / "" in pyproject mean "the typed default" (shared/config.py); for keys where 0 is a real
    setting (`ZERO_IS_A_SETTING`), a negative value does."""
    if key in ZERO_IS_A_SETTING:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and value < 0
    return value in (0, 0.0, "")


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, out = config_from_run_config(dict(context.run_config))
    with run_lock(out):
        report = run_federated(grid, cfg, out)
    log.info("report written to %s (synthetic accuracy %.4f)", out / "report.json", report["accuracy"]["synthetic"])


def make_server_app(cfg: DemoConfig, out: Path) -> ServerApp:
    sim_app = ServerApp()

    @sim_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federated(grid, cfg, out)

    return sim_app


def clear_earlier_simulation(out: Path) -> None:
    """Simulated SuperNodes get new node ids every run, so a pool left in `out` by an earlier run can
    never be resumed, only merged (doubling the data): remove it. Deployments keep their pool, so
    a restarted ServerApp resumes with the nodes already committed."""
    stale = LatentPool(out / "pool")
    if stale.committed_nodes():
        log.warning("new simulated federation: removing the pool of an earlier run in %s", stale.root)
    shutil.rmtree(stale.root)
    (out / "collect_status.json").unlink(missing_ok=True)


def run_simulation_demo(cfg: DemoConfig, out: Path) -> dict:
    """Flower simulation engine, one SuperNode per client, each with one CPU; one run per output folder."""
    for var in ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK", "RAY_USAGE_STATS_ENABLED"):
        os.environ.setdefault(var, "0")
    os.environ.setdefault("FLWR_HOME", str(Path(out).resolve() / ".flwr"))
    fed = cfg.federation or FederationConfig()
    cfg = replace(cfg, federation=fed)
    out = Path(out)
    with run_lock(out):
        return _simulate(cfg, fed, out)


def _simulate(cfg: DemoConfig, fed: FederationConfig, out: Path) -> dict:
    import json

    from flwr.simulation import run_simulation

    from client.app import app as client_app
    (out / "report.json").unlink(missing_ok=True)
    clear_earlier_simulation(out)
    start = time.time()
    run_simulation(server_app=make_server_app(cfg, out), client_app=client_app, num_supernodes=fed.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": os.cpu_count(), "include_dashboard": False}})
    if not (out / "report.json").exists():
        raise RuntimeError(f"the simulated federation ended without a report in {out}; see the log above")
    report = json.loads((out / "report.json").read_text())
    report["seconds"]["wall"] = time.time() - start
    write_json(out / "report.json", report, indent=2)
    return report
