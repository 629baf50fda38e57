"""Crash safety of what a run writes: atomic JSON, one run per output folder, a provenance line cut short
by a crash is repaired (its node asked again), a damaged one stops the run."""
import json
import os

import pytest
import torch

from server.federation.pool import LatentPool
from shared.durable import FolderInUse, run_lock, write_json


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    write_json(path, {"v": 1})

    def crash(*args):
        raise OSError("disk gone")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_one_run_per_output_folder(tmp_path, capsys):
    from server.cli import main
    with run_lock(tmp_path):
        with pytest.raises(FolderInUse, match=f"pid {os.getpid()}"):
            with run_lock(tmp_path):
                pass
        assert main(["demo", "--local", "--out", str(tmp_path), "--train-limit", "100", "--device", "cpu"]) == 2
        assert "is in use by pid" in capsys.readouterr().err
    with run_lock(tmp_path):                      # released with its holder
        pass


def commit(pool, node):
    pool.stage(node, 0, torch.zeros(2, 4, 8, 8), torch.tensor([1, 2]))
    return pool.commit(node, 1, {"num_classes": 10})


def test_a_torn_provenance_line_is_cut_and_its_node_asked_again(tmp_path):
    pool = LatentPool(tmp_path / "pool")
    commit(pool, 1)
    commit(pool, 2)
    text = pool.provenance_path.read_text()
    pool.provenance_path.write_text(text[:-20])                # a crash mid-way through node 2's line
    again = LatentPool(tmp_path / "pool")
    assert again.committed_nodes() == {1}
    assert pool.provenance_path.read_text() == text.splitlines(keepends=True)[0], "repaired on disk"
    commit(again, 2)
    assert again.committed_nodes() == {1, 2} and len(again.load()[1]) == 4


def test_a_damaged_line_before_the_last_stops_the_run(tmp_path):
    pool = LatentPool(tmp_path / "pool")
    commit(pool, 1)
    commit(pool, 2)
    lines = pool.provenance_path.read_text().splitlines(keepends=True)
    pool.provenance_path.write_text("{broken\n" + lines[1])
    with pytest.raises(RuntimeError, match="line 1 is damaged"):
        LatentPool(tmp_path / "pool").provenance()
