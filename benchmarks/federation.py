"""How the collection scales with the number of devices: Flower's simulation engine, one SuperNode per
client on this machine, the full-recipe first encoder, the full private split of the dataset.

`fedcondense bench --federation --clients 10 100 1000` runs one collection per size and split, each in a
fresh process (so that its peak memory is its own), and writes JSON plus a plot:
- wall time of the collection (server side, first request to last commit) and of the whole simulation;
- the server process's peak RSS (driver and ServerApp) and every simulation worker's peak RSS (Ray actors,
  each serving many simulated devices in turn), sampled from /proc;
- bytes on the wire: requests and replies as Flower serialises their records (before gRPC framing),
  and how often the first encoder travelled.
Only the collection runs: condensation and students do not depend on the number of devices.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class FederationBenchConfig:
    clients: tuple[int, ...] = (10, 100, 1000)
    splits: tuple[str, ...] = ("dirichlet", "iid")
    alpha: float = 0.5
    train_limit: int = 0                 # 0: the whole private split
    timeout: float = 600.0


class ProcessRSS:
    """Peak RSS (MB) of every process whose command line contains `marker`, sampled every 0.2 s."""

    def __init__(self, marker: str):
        self.marker, self.peaks = marker, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _watch(self):
        while not self._stop.wait(0.2):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        if self.marker.encode() not in fh.read():
                            continue
                    with open(f"/proc/{pid}/statm") as fh:
                        mb = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
                except OSError:
                    continue
                self.peaks[pid] = max(self.peaks.get(pid, 0.0), mb)


def first_encoder():
    """The full recipe's committed first encoder (its weights are what every device receives)."""
    from shared.models.first_encoder import FirstEncoder
    return FirstEncoder.from_pretrained(str(REPO / "shared" / "checkpoints" / "full" / "autoencoder" / "first_encoder"))


def collection_app(fed, data_cfg, out: Path):
    from flwr.serverapp import ServerApp

    from server.federation.collect import collect
    from server.federation.pool import LatentPool
    from shared.accounting import ImageRelease
    from shared.durable import write_json
    app = ServerApp()

    @app.main()
    def _main(grid, context) -> None:
        result = collect(grid, first_encoder().eval(), data_cfg, fed, ImageRelease(0.0, 0.0, 0.0, "public", None, 10),
                         LatentPool(out / "pool"), 10, (28, 28))
        result["pooled_latents"] = sum(e["latents"] for e in LatentPool(out / "pool").provenance())
        write_json(out / "collect.json", {k: v for k, v in result.items() if k != "clients"})

    return app


def run_one(clients: int, split: str, alpha: float, train_limit: int, timeout: float, out: Path) -> dict:
    """One collection in this process; the figures of `run_size`'s row."""
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from shared.config import DataConfig, FederationConfig
    out.mkdir(parents=True, exist_ok=True)
    fed = FederationConfig(clients=clients, iid=split == "iid", alpha=alpha, timeout=timeout, startup_grace=120.0)
    data_cfg = DataConfig(train_limit=train_limit)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.time()
    with ProcessRSS("ClientAppActor") as actors, ProcessRSS("ray") as ray_all:
        run_simulation(server_app=collection_app(fed, data_cfg, out), client_app=client_app, num_supernodes=clients,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": os.cpu_count(), "include_dashboard": False}})
    wall = time.time() - start
    if not (out / "collect.json").exists():
        raise RuntimeError(f"the collection with {clients} clients wrote no result; see the log above")
    col = json.loads((out / "collect.json").read_text())
    actor_peaks = sorted(actors.peaks.values())
    return {"clients": clients, "split": split, "alpha": alpha if split == "dirichlet" else None,
            "accepted": len(col["accepted_nodes"]), "dropped": len(col["dropped_nodes"]),
            "retries": len(col["retries"]), "pooled_latents": col["pooled_latents"],
            "collect_seconds": col["collect_seconds"], "simulation_seconds": wall, **col["traffic"],
            "bytes_received_ciphertext": col["bytes_received"],
            "server_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "server_rss_before_mb": base, "workers": len(actor_peaks),
            "worker_peak_rss_mb": actor_peaks[-1] if actor_peaks else None,
            "ray_total_peak_rss_mb": sum(ray_all.peaks.values())}


def run_size(clients: int, split: str, cfg: FederationBenchConfig, work: Path) -> dict:
    """`run_one` in a fresh process."""
    dest = work / f"{split}-{clients}"
    args = [sys.executable, "-m", "benchmarks.federation", "--clients", str(clients), "--split", split,
            "--alpha", str(cfg.alpha), "--train-limit", str(cfg.train_limit), "--timeout", str(cfg.timeout),
            "--work", str(dest)]
    env = {**os.environ, "FLWR_HOME": str(dest / ".flwr"), "FEDCONDENSE_PROGRESS": "0"}
    print(f"federation bench: {clients} clients, {split} ...", file=sys.stderr, flush=True)
    res = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{clients} clients ({split}) failed:\n{res.stderr[-3000:]}")
    row = json.loads((dest / "row.json").read_text())
    print(f"  {row['collect_seconds']:.1f}s, server {row['server_peak_rss_mb']:.0f} MB, worker "
          f"{row['worker_peak_rss_mb']} MB, {row['request_bytes'] / 1e6:.1f} MB out", file=sys.stderr, flush=True)
    return row


def growth(rows: list[dict]) -> list[dict]:
    """Per split: each measure at the largest size over the smallest, beside the ratio of clients."""
    out = []
    for split in sorted({r["split"] for r in rows}):
        part = sorted((r for r in rows if r["split"] == split), key=lambda r: r["clients"])
        lo, hi = part[0], part[-1]
        out.append({"split": split, "from": lo["clients"], "to": hi["clients"], "clients_ratio": hi["clients"] / lo["clients"],
                    **{f"{k}_ratio": hi[k] / lo[k] for k in ("collect_seconds", "server_peak_rss_mb", "request_bytes",
                                                             "reply_bytes") if lo.get(k)}})
    return out


def markdown(doc: dict) -> str:
    """The rows and the growth from the smallest to the largest fleet, as a table for docs/scale.md."""
    lines = [f"{doc['machine']}, {doc['date']}; {doc['rows'][0]['pooled_latents']} latents (the whole private split); "
             f"first encoder: {doc['config']['encoder']}.", "",
             "| split | clients | accepted | collection (s) | server peak RSS (MB) | worker peak RSS (MB) | workers "
             "| requests (MB) | E1 sent | replies (MB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['split']} | {r['clients']} | {r['accepted']} | {r['collect_seconds']:.1f} | "
                     f"{r['server_peak_rss_mb']:.0f} | {r['worker_peak_rss_mb']:.0f} | {r['workers']} | "
                     f"{r['request_bytes'] / 1e6:.1f} | {r['encoder_sends']} | {r['reply_bytes'] / 1e6:.1f} |")
    lines.append("")
    for g in doc["growth"]:
        lines.append(f"- {g['split']}, {g['from']} -> {g['to']} clients (x{g['clients_ratio']:.0f}): collection time "
                     f"x{g['collect_seconds_ratio']:.2f}, server peak RSS x{g['server_peak_rss_mb_ratio']:.2f}, "
                     f"request bytes x{g['request_bytes_ratio']:.0f}, reply bytes x{g['reply_bytes_ratio']:.2f}.")
    return "\n".join(lines)


def update_doc(doc: dict, page: Path) -> None:
    """Rewrite the table between the federation-bench markers of `page`."""
    text = page.read_text()
    start, end = "<!-- federation-bench:start -->", "<!-- federation-bench:end -->"
    head, rest = text.split(start)
    page.write_text(f"{head}{start}\n{markdown(doc)}\n{end}{rest.split(end)[1]}")


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for split in sorted({r["split"] for r in doc["rows"]}):
        rows = sorted((r for r in doc["rows"] if r["split"] == split), key=lambda r: r["clients"])
        x = [r["clients"] for r in rows]
        axes[0].plot(x, [r["collect_seconds"] for r in rows], "o-", label=split)
        axes[1].plot(x, [r["server_peak_rss_mb"] for r in rows], "o-", label=f"server, {split}")
        axes[1].plot(x, [r["worker_peak_rss_mb"] for r in rows], "s--", label=f"one worker, {split}")
        axes[2].plot(x, [r["request_bytes"] / 1e6 for r in rows], "o-", label=f"requests, {split}")
        axes[2].plot(x, [r["reply_bytes"] / 1e6 for r in rows], "s--", label=f"replies, {split}")
    for ax, title in zip(axes, ("collection wall time (s)", "peak RSS (MB)", "bytes on the wire (MB)")):
        ax.set_xscale("log")
        ax.set_xlabel("simulated clients")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"Collection of {doc['rows'][0]['pooled_latents']} latents, {doc['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_federation_bench(cfg: FederationBenchConfig, out_dir: Path) -> Path:
    import platform
    import tempfile
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedbench-") as work:
        rows = [run_size(n, split, cfg, Path(work)) for split in cfg.splits for n in sorted(cfg.clients)]
    doc = {"bench": "federation", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "config": {"clients": list(cfg.clients), "splits": list(cfg.splits), "alpha": cfg.alpha,
                      "train_limit": cfg.train_limit, "encoder": "full recipe (shared/checkpoints/full)"},
           "rows": rows, "growth": growth(rows), "date": time.strftime("%Y-%m-%d")}
    stem = out_dir / f"federation-scale-{doc['date']}-cpu{os.cpu_count()}"
    (stem.with_suffix(".json")).write_text(json.dumps(doc, indent=1))
    plot(doc, stem.with_suffix(".png"))
    return stem.with_suffix(".json")


def main() -> None:
    p = argparse.ArgumentParser(description="one collection of the federation bench (run by `fedcondense bench "
                                            "--federation`)")
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--split", choices=["dirichlet", "iid"], default="dirichlet")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--train-limit", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--work", required=True)
    a = p.parse_args()
    row = run_one(a.clients, a.split, a.alpha, a.train_limit, a.timeout, Path(a.work))
    (Path(a.work) / "row.json").write_text(json.dumps(row))


if __name__ == "__main__":
    main()
