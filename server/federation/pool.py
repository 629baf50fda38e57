"""On-disk pool of accepted latents with per-client provenance.

A node's chunks are staged in memory and committed only when all of them are in: one safetensors
file per node written to a temporary name and renamed (atomic on POSIX), then one JSON line in
`provenance.jsonl`. A node that drops mid-way leaves nothing on disk; a server that crashes resumes
with the nodes already committed (`committed_nodes`).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


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
        if not self.provenance_path.exists():
            return []
        return [json.loads(line) for line in self.provenance_path.read_text().splitlines() if line.strip()]

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
        os.replace(tmp, final)
        entry = {"node_id": node_id, "file": final.name, "latents": len(y), "chunks": num_chunks,
                 "class_histogram": torch.bincount(y, minlength=meta.get("num_classes", 0)).tolist(),
                 "committed_at": time.time(), **{k: v for k, v in meta.items() if k != "num_classes"}}
        with open(self.provenance_path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return entry

    def load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents fp32, labels, ids) over every committed node in commit order. Flower node ids are
        64-bit unsigned, so ids are `rank * 10**7 + position`, rank = the node's line in provenance."""
        zs, ys, ids = [], [], []
        for rank, entry in enumerate(self.provenance()):
            t = load_file(str(self.root / entry["file"]))
            zs.append(t["latents"].float())
            ys.append(t["labels"].long())
            ids.append(rank * 10**7 + torch.arange(len(ys[-1])))
        if not zs:
            raise RuntimeError(f"the pool at {self.root} is empty: no client submission was accepted")
        return torch.cat(zs), torch.cat(ys), torch.cat(ids)
