"""Teacher and distillation with weak/strong augmentation."""
import pytest
import torch

from client.encode import encode_images
from server.distill.student import evaluate, train_student
from server.distill.teacher import train_teacher
from shared.augment import random_affine
from shared.config import DataConfig, StudentConfig
from shared.data import load_dataset


@pytest.fixture(scope="module")
def setup(tiny_models):
    _, models = tiny_models
    ds = load_dataset(DataConfig(public_size=500, train_limit=3000, test_limit=500))
    latents = encode_images(models["first_encoder"], ds.private.images)
    teacher, _ = train_teacher(models["first_encoder"], models["second_encoder"], latents, ds.private.labels, 10,
                               torch.device("cpu"), steps=150, batch_size=128)
    return ds, teacher


def test_teacher_learns_from_latents(setup):
    ds, teacher = setup
    assert evaluate(teacher, ds.test.images, ds.test.labels, torch.device("cpu")) > 0.5


def test_evaluation_batches_do_not_change_the_accuracy(setup):
    """`evaluate` batches by 100 on CPU for speed: the accuracy equals that of batches of 1,000 and of one
    batch, for the teacher and for an untrained ConvNet-3 (many near-ties, so any drift in logits shows)."""
    from shared.models.students import build_student
    ds, teacher = setup
    torch.manual_seed(0)
    for model in (teacher, build_student("convnet3", 1, 10)):
        accs = {evaluate(model, ds.test.images, ds.test.labels, torch.device("cpu"), bs) for bs in (None, 1000, 500)}
        assert len(accs) == 1, accs


def test_distillation_with_teacher_runs_every_family(setup):
    ds, teacher = setup
    x, y = ds.private.images[:100], torch.nn.functional.one_hot(ds.private.labels[:100], 10).float()
    cfg = StudentConfig(steps=5, batch_size=32)
    for spec in ("soft_ce:1,kd:1", "dkd", "mi_prior", "ddkd", "mixed"):
        model = train_student(x, y, cfg, torch.device("cpu"), loss=spec, teacher=teacher)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match="needs a teacher"):
        train_student(x, y, cfg, torch.device("cpu"), loss="kd")
    with pytest.raises(ValueError, match="teacher channels >= student channels"):
        train_student(x, y, cfg, torch.device("cpu"), loss="channel_sparse", teacher=setup[1])


@pytest.mark.parametrize("spec", ["soft_ce:1,mixed:1", "soft_ce:1,attention:1"])
def test_attention_losses_train_a_working_student(setup, spec):
    """Regression: `soft_ce:1,mixed:1` used to blow the logits up within two steps."""
    ds, teacher = setup
    x, y = ds.private.images[:600], torch.nn.functional.one_hot(ds.private.labels[:600], 10).float()
    model = train_student(x, y, StudentConfig(model="convnet3_w32", steps=40, batch_size=64), torch.device("cpu"),
                          loss=spec, teacher=teacher)
    with torch.no_grad():
        assert model(ds.test.images[:200]).abs().max() < 100
    assert evaluate(model, ds.test.images, ds.test.labels, torch.device("cpu")) > 0.4


def test_weak_view_is_the_same_transform_at_lower_strength():
    """Same draws: the teacher's view moves a bright pixel half as far as the student's (docs/spec.md §2)."""
    img = torch.full((64, 1, 32, 32), -1.0)
    img[:, :, 10, 20] = 1.0
    grid_y, grid_x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")

    def centroid(x):
        w = (x[:, 0] + 1).clamp_min(0)
        return torch.stack([(w * grid_x).sum((1, 2)) / w.sum((1, 2)), (w * grid_y).sum((1, 2)) / w.sum((1, 2))], 1)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    strong = random_affine(img, 1.0, g, flip=False)
    weak = random_affine(img, 0.5, torch.Generator().set_state(state), flip=False)
    move_strong = (centroid(strong) - centroid(img)).norm(dim=1)
    move_weak = (centroid(weak) - centroid(img)).norm(dim=1)
    ratio = (move_weak / move_strong.clamp_min(1e-6))[move_strong > 1.0]
    assert 0.35 < ratio.median() < 0.65


def test_only_teacher_based_loss_specs_train_a_teacher():
    from server.distill.losses import needs_teacher
    assert not needs_teacher("soft_ce") and not needs_teacher("soft_ce:2")
    assert needs_teacher("soft_ce:1,kd:1") and needs_teacher("dkd") and needs_teacher("channel_sparse")
    with pytest.raises(KeyError, match="unknown loss"):
        needs_teacher("soft_ce,kdd")


def test_a_teacher_the_loss_never_consults_is_ignored(setup):
    """Callers pass their teacher unconditionally; plain soft_ce never runs it, a KD term always does."""
    ds, teacher = setup
    x, y = ds.private.images[:64], torch.nn.functional.one_hot(ds.private.labels[:64], 10).float()
    calls = []
    hook = teacher.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        cfg = StudentConfig(steps=3, batch_size=32)
        alone = train_student(x, y, cfg, torch.device("cpu"), loss="soft_ce")
        given = train_student(x, y, cfg, torch.device("cpu"), loss="soft_ce", teacher=teacher)
        assert not calls
        assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), given.state_dict().values()))
        train_student(x, y, cfg, torch.device("cpu"), loss="soft_ce:1,kd:1", teacher=teacher)
        assert calls
    finally:
        hook.remove()


def test_teacher_view_follows_each_term_unless_set():
    """Plain KD labels the student's own view; docs/spec.md §2's MI loss asks for a weak one; an override wins."""
    from server.distill.losses import teacher_views
    assert teacher_views("soft_ce:0.25,kd:1") == {"kd": 1.0} and teacher_views("dkd") == {"dkd": 1.0}
    assert teacher_views("soft_ce:1,mi_prior:1") == {"mi_prior": 0.5}
    assert teacher_views("soft_ce:0.1,kd:0.9,mi_prior:1") == {"kd": 1.0, "mi_prior": 0.5}
    assert teacher_views("kd,mi_prior", 0.3) == {"kd": 0.3, "mi_prior": 0.3}
    assert teacher_views("soft_ce") == {}
    with pytest.raises(ValueError, match=r"teacher_strength must be in \[0, 1\]"):
        teacher_views("kd", 1.5)


def test_each_term_reads_the_teacher_on_its_own_view():
    """MI beside KD: KD's labels stay on the student's view, MI's come from the weak one."""
    from server.distill.losses import LossInputs
    from server.distill.student import _teacher_logits
    inp = LossInputs(torch.zeros(2, 3), torch.zeros(2, 3))
    _teacher_logits(inp, torch.nn.Identity(), {"kd": 1.0, "mi_prior": 0.5}, lambda s: torch.full((2, 3), s))
    assert torch.equal(inp.need_teacher("kd"), torch.full((2, 3), 1.0))
    assert torch.equal(inp.need_teacher("mi_prior"), torch.full((2, 3), 0.5))
    assert torch.equal(inp.teacher_logits, torch.full((2, 3), 1.0))


@pytest.mark.parametrize("spec, passes, same_view_last", [("soft_ce:0.25,kd:1", 1, True),
                                                          ("soft_ce:1,mi_prior:1", 1, False),
                                                          ("soft_ce:0.1,kd:0.9,mi_prior:1", 2, True)])
def test_teacher_sees_the_views_its_losses_ask_for(setup, spec, passes, same_view_last, monkeypatch):
    """What reaches the teacher in training: the student's exact input for KD, a different one for MI, both
    (the weak one first) for MI beside KD."""
    import server.distill.student as student_module
    ds, teacher = setup
    seen, hooks = {"teacher": []}, []
    build = student_module.build_student

    def build_and_record(*args, **kwargs):
        model = build(*args, **kwargs)
        hooks.append(model.register_forward_pre_hook(lambda module, args: seen.__setitem__("student", args[0].clone())))
        return model
    monkeypatch.setattr(student_module, "build_student", build_and_record)
    hooks.append(teacher.register_forward_pre_hook(lambda module, args: seen["teacher"].append(args[0].clone())))
    x, y = ds.private.images[:64], torch.nn.functional.one_hot(ds.private.labels[:64], 10).float()
    try:
        train_student(x, y, StudentConfig(model="convnet3_w32", steps=1, batch_size=32), torch.device("cpu"),
                      loss=spec, teacher=teacher)
    finally:
        for hook in hooks:
            hook.remove()
    views = seen["teacher"][-passes:]           # the passes of the training step (feature probing runs first)
    assert all(v.shape == seen["student"].shape == (32, 1, 32, 32) for v in views)
    assert torch.equal(views[-1], seen["student"]) == same_view_last
    assert not any(torch.equal(v, seen["student"]) for v in views[:-1])


def test_a_native_run_on_the_same_setting_updates_its_file_whatever_device_string_it_named(tmp_path):
    """`--device cpu` and `--device auto` on one machine measure one setting (the file name names the machine):
    the run's methods replace their rows. Other seeds or another teacher are another setting: no merge."""
    import json
    from benchmarks.distill_native import merged_rows
    config = {"seeds": [0, 1], "per_class": 100, "device": "auto", "methods": ["kd", "channel_sparse+kd"]}
    old = [{"student": "s", "seed": k, "method": m, "accuracy": 0.5} for k in (0, 1) for m in config["methods"]]
    path = tmp_path / "file.json"
    path.write_text(json.dumps({"config": config, "teacher": {"accuracy": 0.9}, "rows": old, "created": "then"}))
    new = [{"student": "s", "seed": k, "method": "kd", "accuracy": 0.6} for k in (0, 1)]
    rows, methods = merged_rows(path, {**config, "device": "cpu", "methods": ["kd"]}, {"accuracy": 0.9}, new)
    assert methods == ["kd", "channel_sparse+kd"] and len(rows) == 4
    assert sorted(r["accuracy"] for r in rows if r["method"] == "kd") == [0.6, 0.6]
    assert merged_rows(path, {**config, "seeds": [0, 1, 2]}, {"accuracy": 0.9}, new) is None
    assert merged_rows(path, config, {"accuracy": 0.8}, new) is None
    # a first file lists its methods in the registry's order (ce, kd, ...), whatever order they ran in
    ran = [{"student": "s", "seed": 0, "method": m, "accuracy": 0.5} for m in ("dkd", "ce", "kd")]
    rows, methods = merged_rows(tmp_path / "new.json", {**config, "methods": ["dkd", "ce", "kd"]}, {"accuracy": 0.9}, ran)
    assert methods == [r["method"] for r in rows] == ["ce", "kd", "dkd"]


def test_native_students_train_at_their_papers_learning_rate():
    """mdistiller trains ShuffleNet and MobileNet students at LR 0.01 and the others at 0.05; the native bench
    follows it per student (at 0.05 DKD's beta-8 term threw a ShuffleNetV2 0.5x student to 69.7 ± 8.3 %)."""
    from benchmarks.distill_native import NativeDistillConfig, student_config
    cfg = NativeDistillConfig()
    lr = lambda name: student_config(cfg, name, 0, 10).lr
    assert lr("shufflenet_v2_x05") == lr("mobilenet_v2") == cfg.light_lr == 0.01
    assert lr("resnet8") == lr("convnet3_w32") == lr(cfg.teacher) == cfg.lr == 0.05
