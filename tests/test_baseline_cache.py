"""Reused baseline students (server/distill/baseline_cache.py): reused only when every input matches, and what
is reused is what training gives."""
import json
import shutil
from pathlib import Path
from dataclasses import replace

import torch

from server.distill.baseline_cache import baseline_key, baseline_score, code_fingerprint
from server.distill.student import one_hot
from shared.config import StudentConfig
from shared.data import ImageSplit

CPU = torch.device("cpu")
CFG = StudentConfig(model="convnet3_w32", steps=4, batch_size=10, loss="soft_ce")


def _split(n: int, seed: int) -> ImageSplit:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.rand(n, 1, 16, 16, generator=gen) * 2 - 1 + labels.view(-1, 1, 1, 1) * 0.3
    return ImageSplit(images.clamp(-1, 1), labels, torch.arange(n))


def _score(train: ImageSplit, test: ImageSplit, cfg=CFG, **kw) -> dict:
    return baseline_score("random_real", train.images, one_hot(train.labels, 3), test, cfg, CPU, loss=cfg.loss, **kw)


def test_a_baseline_is_reused_only_when_every_input_matches():
    train, test = _split(30, 0), _split(40, 1)
    first = _score(train, test)
    assert "cached" not in first
    again = _score(train, test)
    assert again["cached"] and again["accuracy"] == first["accuracy"] and again["trained_seconds"] == first["seconds"]
    stored = json.loads((Path(again["cached"]) / "result.json").read_text())
    assert stored["arm"] == "random_real" and stored["key"]["steps"] == 4 and stored["key"]["teacher"] is None
    (Path(again["cached"]) / "result.json").write_text('{"result": {"accuracy": "lost')
    repaired = _score(train, test)
    assert "cached" not in repaired and repaired["accuracy"] == first["accuracy"], "an unreadable entry trains again"
    assert _score(train, test)["cached"], "and is rewritten"
    retrained = _score(train, test, reuse=False)
    assert "cached" not in retrained and retrained["accuracy"] == first["accuracy"], "the stored result is training's"
    pixel = train.images.clone()
    pixel[0, 0, 0, 0] += 0.01
    changed = {"student seed": _score(train, test, replace(CFG, seed=1)),
               "student steps": _score(train, test, replace(CFG, steps=5)),
               "one training pixel": _score(ImageSplit(pixel, train.labels, train.ids), test),
               "one test label": _score(train, ImageSplit(test.images, (test.labels + (torch.arange(40) == 0)) % 3,
                                                          test.ids))}
    assert not [what for what, r in changed.items() if "cached" in r], "a changed input must train afresh"


def test_the_key_covers_the_teacher_only_when_the_loss_reads_it():
    train, test = _split(8, 0), _split(8, 1)
    teacher = torch.nn.Linear(4, 3)
    key = lambda loss: baseline_key(train.images, one_hot(train.labels, 3), test, CFG, CPU, None, loss, teacher)
    kd = key("soft_ce:0.25,kd:1")
    assert key("soft_ce")["teacher"] is None and kd["teacher"]
    with torch.no_grad():
        teacher.bias[0] += 1e-3
    assert key("soft_ce:0.25,kd:1")["teacher"] != kd["teacher"], "other teacher weights, another entry"
    assert kd["libraries"]["torch"] == torch.__version__
    assert kd["cpu_kernels"] == torch.backends.cpu.get_cpu_capability() and kd["threads"] == torch.get_num_threads()


def test_the_code_fingerprint_changes_with_any_source_file(tmp_path):
    import server
    root = tmp_path / "server"
    shutil.copytree(next(iter(server.__path__)), root, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_fingerprint([root])
    assert code_fingerprint([root]) == before
    student = root / "distill" / "student.py"
    student.write_text(student.read_text() + "\n# a changed recipe\n")
    assert code_fingerprint([root]) != before


def test_retrain_baselines_reaches_the_config_from_the_cli_and_the_run_config():
    import tomllib

    from server.federation.app import config_from_run_config
    from server.cli import build_parser
    from server.options import demo_config
    from shared.config import DemoConfig
    parse = build_parser().parse_args
    assert DemoConfig().reuse_baselines and demo_config(parse(["demo"])).reuse_baselines
    assert not demo_config(parse(["demo", "--retrain-baselines"])).reuse_baselines
    shipped = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert shipped["retrain-baselines"] is False and config_from_run_config(shipped)[0].reuse_baselines
    assert not config_from_run_config({**shipped, "retrain-baselines": True})[0].reuse_baselines
