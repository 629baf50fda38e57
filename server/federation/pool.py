"""On-disk pool of accepted latents with per-client provenance.

A node's chunks are staged in memory and committed only when all of them are in: one safetensors
file per node written to a temporary name and renamed (atomic on POSIX), then one JSON line in
`provenance.jsonl`. A node that drops mid-way leaves nothing on disk; a server that crashes resumes
with the nodes already committed (`committed_nodes`).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shared.durable import fsync_dir

log = logging.getLogger("fedcondense.pool")


class LatentPool:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob("*.tmp"):       # debris of a crash mid-write never counts
            stale.unlink()
        self._staged: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}

    @property
    def provenance_path(self) -> Path:
        return self.root / "provenance.jsonl"

    def provenance(self) -> list[dict]:
        """One entry per committed node. A last line cut short by a crash (no newline, or not JSON) was never
        committed: it is cut off and logged, and that node is asked again. A bad line before the last is
        damage, not a crash, and stops the run."""
        if not self.provenance_path.exists():
            return []
        text = self.provenance_path.read_text()
        lines = text.split("\n")
        entries = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                complete = i < len(lines) - 1                   # followed by its newline
            except json.JSONDecodeError:
                entry, complete = None, False
            if complete:
                entries.append(entry)
            elif i >= len(lines) - 2 and not "".join(lines[i + 1:]).strip():
                return self._cut_torn_line(entries, line)
            else:
                raise RuntimeError(f"{self.provenance_path} line {i + 1} is damaged; restore the file or start "
                                   f"a new output folder")
        return entries

    def _cut_torn_line(self, entries: list[dict], line: str) -> list[dict]:
        log.warning("cutting a provenance line left incomplete by a crash (%d bytes); its node will be asked again",
                    len(line))
        tmp = self.provenance_path.with_suffix(".repair")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in entries))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.provenance_path)
        fsync_dir(self.root)
        return entries

    def committed_nodes(self) -> set[int]:
        return {p["node_id"] for p in self.provenance()}

    def stage(self, node_id: int, chunk: int, latents: torch.Tensor, labels: torch.Tensor) -> None:
        self._staged.setdefault(node_id, {})[chunk] = (latents, labels)

    def discard(self, node_id: int) -> int:
        """Drop whatever a node staged; returns how many chunks were dropped."""
        return len(self._staged.pop(node_id, {}))

    def commit(self, node_id: int, num_chunks: int, meta: dict) -> dict:
        chunks = self._staged.pop(node_id)
        if sorted(chunks) != list(range(num_chunks)):
            raise RuntimeError(f"node {node_id}: committing chunks {sorted(chunks)} of {num_chunks}")
        z = torch.cat([chunks[c][0] for c in range(num_chunks)])
        y = torch.cat([chunks[c][1] for c in range(num_chunks)])
        final = self.root / f"node-{node_id}.safetensors"
        tmp = final.with_suffix(".tmp")
        save_file({"latents": z.half().contiguous(), "labels": y.to(torch.uint8).contiguous()}, str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(self.root)
        entry = {"node_id": node_id, "file": final.name, "latents": len(y), "chunks": num_chunks,
                 "class_histogram": torch.bincount(y, minlength=meta.get("num_classes", 0)).tolist(),
                 "committed_at": time.time(), **{k: v for k, v in meta.items() if k != "num_classes"}}
        with open(self.provenance_path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return entry

    def load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents fp32, labels, ids) over every committed node in ascending node id. Flower node ids are
        64-bit unsigned, so ids are `rank * 10**7 + position`, rank = the node's place among the pooled node
        ids in ascending order: the same whatever order the nodes arrived in, or over how many runs."""
        zs, ys, ids = [], [], []
        for rank, entry in enumerate(sorted(self.provenance(), key=lambda e: e["node_id"])):
            t = load_file(str(self.root / entry["file"]))
            zs.append(t["latents"].float())
            ys.append(t["labels"].long())
            ids.append(rank * 10**7 + torch.arange(len(ys[-1])))
        if not zs:
            raise RuntimeError(f"the pool at {self.root} is empty: no client submission was accepted")
        return torch.cat(zs), torch.cat(ys), torch.cat(ids)
