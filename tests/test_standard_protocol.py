"""The field's standard evaluation protocol and the pieces around it, at tiny scale: evaluators trained side
by side, DSA, multi-image formation, coresets, distribution matching, the latent refinement, recipes and
the committed checkpoints."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from benchmarks.coresets import herding, k_center
from server.distill.evaluate import LabelledSet, evaluate_sets
from server.condense.formation import expand, form
from server.condense.matching import match, pixel_set
from shared.augment import DSA_FAMILIES, apply_dsa, draw_dsa
from shared.config import DataConfig, EvaluationConfig
from shared.data import load_dataset
from shared.models.students import ConvNet, EnsembleConvNet


@pytest.fixture(scope="module")
def fmnist():
    return load_dataset(DataConfig(train_limit=2000, test_limit=500))


def test_an_ensemble_member_computes_what_a_lone_convnet_computes():
    torch.manual_seed(0)
    ens = EnsembleConvNet(3, 1, 10, 16, 3, 32)
    x = torch.randn(5, 3, 32, 32)
    out = ens(x)
    for m in range(3):
        net = ConvNet(1, 10, 16, 3, 32)
        for i, layer in enumerate(ens.features):
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.GroupNorm)):
                w = layer.weight.view(3, -1, *layer.weight.shape[1:])[m]
                net.features[i].weight.data.copy_(w.reshape(net.features[i].weight.shape))
                net.features[i].bias.data.copy_(layer.bias.view(3, -1)[m])
        net.classifier.weight.data.copy_(ens.weight[m])
        net.classifier.bias.data.copy_(ens.bias[m])
        assert torch.allclose(net(x[:, m:m + 1]), out[m], atol=1e-5)


def test_dsa_families_change_images_differentiably_and_siamese_draws_agree():
    x = torch.rand(len(DSA_FAMILIES) * 4, 1, 32, 32, requires_grad=True)
    draw = draw_dsa(len(x), torch.Generator().manual_seed(0), torch.arange(len(DSA_FAMILIES)).repeat_interleave(4))
    draw.family = torch.arange(len(DSA_FAMILIES)).repeat_interleave(4)         # every family once per group
    out = apply_dsa(x, draw)
    assert out.shape == x.shape
    for f in range(len(DSA_FAMILIES)):
        assert not torch.allclose(out[4 * f:4 * f + 4], x[4 * f:4 * f + 4]), DSA_FAMILIES[f]
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    assert torch.equal(apply_dsa(x.detach(), draw), apply_dsa(x.detach().clone(), draw)), "one draw, one result"


def test_formation_tiles_and_expands_back():
    x = torch.rand(8, 1, 32, 32)
    stored = form(x, 2)
    assert stored.shape == (2, 1, 32, 32)
    assert torch.allclose(stored[0, :, :16, 16:], F.interpolate(x[1:2], scale_factor=0.5, mode="area")[0])
    tiles, labels = expand(stored, torch.eye(2), 2)
    assert tiles.shape == (8, 1, 32, 32) and torch.equal(labels, torch.eye(2).repeat_interleave(4, 0))
    with pytest.raises(ValueError, match="multiple of 4"):
        form(x[:6], 2)


def test_standard_protocol_learns_from_real_images_and_reports_every_evaluator(fmnist):
    x, y = fmnist.private.images, fmnist.private.labels
    idx = torch.cat([torch.nonzero(y == c).flatten()[:20] for c in range(10)])
    real = LabelledSet("real", x[idx], F.one_hot(y[idx], 10).float())
    noise = LabelledSet("noise", torch.rand(200, 1, 32, 32) * 2 - 1, F.one_hot(y[idx], 10).float())
    out = evaluate_sets([real, noise], fmnist.test, EvaluationConfig(epochs=15, evaluators=2, width=32, max_members=4),
                        torch.device("cpu"))
    r = out["sets"]
    assert len(r["real"]["accuracy"]) == 2 and r["real"]["mean"] > 0.45 and r["noise"]["mean"] < 0.25
    assert out["protocol"] == "standard" and out["config"]["augment"] == "dsa"


def test_hard_labels_are_the_argmax_of_soft_ones():
    st = LabelledSet("s", torch.zeros(2, 1, 32, 32), torch.tensor([[0.6, 0.4], [0.3, 0.7]]))
    assert torch.equal(st.training_data("hard")[1], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.equal(st.training_data("soft")[1], st.labels)


def test_coresets_pick_what_their_rules_say():
    f = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    labels = torch.zeros(5, dtype=torch.long)
    assert herding(f, labels, 1).tolist() == [3], "the point nearest the mean (3.2)"
    assert herding(f, labels, 2).tolist() == [3, 2], "then the one that brings the running mean nearest it"
    assert k_center(f, labels, 2).tolist() == [3, 4], "start at the point nearest the mean, then the farthest"
    assert k_center(f, labels, 3).tolist() == [3, 4, 0]


def test_distribution_matching_reduces_its_objective(fmnist):
    x, y = fmnist.private.images, fmnist.private.labels
    idx = torch.cat([torch.nonzero(y == c).flatten()[:1] for c in range(10)])
    s = pixel_set("dm", torch.rand(10, 1, 32, 32) * 2 - 1, y[idx], lr=0.5)
    info = match([s], x, y, 10, 30, torch.device("cpu"), real_batch=16, width=32, log_every=1)
    first, last = s.losses[0][1], sum(l for _, l in s.losses[-5:]) / 5
    assert last < 0.8 * first and info["iterations"] == 30


def test_a_time_limit_stops_matching_early(fmnist):
    s = pixel_set("dm", torch.zeros(10, 1, 32, 32), torch.arange(10))
    info = match([s], fmnist.private.images, fmnist.private.labels, 10, 10_000, torch.device("cpu"), real_batch=8,
                 width=16, time_limit=1.0)
    assert 0 < info["iterations"] < 10_000


def test_recipes_inherit_and_refuse_unknown_keys(tmp_path):
    from shared.config import DemoConfig
    from shared.recipe import apply_recipe, recipe_names
    demo = apply_recipe(DemoConfig(), "demo")
    assert demo.chain.layout == "shared" and demo.protocol == "standard", "demo inherits full, then runs standard"
    assert demo.condense.refine_real_batch == 64 and apply_recipe(DemoConfig(), "full").condense.refine_real_batch == 256
    assert {"small", "demo", "full"} <= set(recipe_names())
    from server.condense.matching import MATCH_OBJECTIVES
    from server.options import check_refinement
    for name in recipe_names():                      # every committed recipe passes the checks a run makes first
        cond = apply_recipe(DemoConfig(), name).condense
        MATCH_OBJECTIVES[cond.refine_objective]
        check_refinement(cond)
    trained = apply_recipe(DemoConfig(), "demo-trained").condense
    assert (trained.refine_networks, trained.refine_pool_steps, trained.refine_objective) == ("trained", 600, "mmd")
    bad = tmp_path / "bad.toml"
    bad.write_text("[chain]\nlayers = 3\n")
    with pytest.raises(ValueError, match="unknown keys"):
        apply_recipe(DemoConfig(), str(bad))
    with pytest.raises(FileNotFoundError, match="no recipe"):
        apply_recipe(DemoConfig(), "nonesuch")


def test_committed_checkpoints_are_checked_before_use(tmp_path, monkeypatch):
    """The committed full-recipe autoencoder installs only on an exact match, and a tampered file is refused."""
    import server.condense.committed as committed
    from shared.cache import fingerprint
    from shared.cache import to_jsonable
    from shared.config import AutoencoderConfig
    from shared.recipe import apply_recipe
    from shared.config import DemoConfig
    manifest = json.loads((committed.ROOT / "full" / "manifest.json").read_text())
    cfg = apply_recipe(DemoConfig(), "full").autoencoder
    public = fingerprint(load_dataset(DataConfig()).public.images)
    assert manifest["entries"]["autoencoder"]["public_fingerprint"] == public, "trained on this public split"
    assert committed.install("autoencoder", tmp_path / "other", config=to_jsonable(AutoencoderConfig()),
                             public_fingerprint=public) is None, "another config trains its own"
    used = committed.install("autoencoder", tmp_path / "ae", config=to_jsonable(cfg), public_fingerprint=public)
    assert used["recipe"] == "full" and (tmp_path / "ae" / "first_encoder").is_dir()
    copy = tmp_path / "root"
    shutil.copytree(committed.ROOT, copy)
    (copy / "full" / "autoencoder" / "meta.json").write_text("{}")
    monkeypatch.setattr(committed, "ROOT", copy)
    with pytest.raises(RuntimeError, match="SHA-256"):
        committed.install("autoencoder", tmp_path / "ae2", config=to_jsonable(cfg), public_fingerprint=public)


def test_standard_bench_smoke(tmp_path):
    """`fedcondense bench --protocol standard` end to end at tiny scale: every arm, the max-coverage arms (every
    private latent once; a random real subset of the same class counts beside it), JSON, page, grids."""
    from server.cli import main
    tiny = ["--train-limit", "1500", "--test-limit", "300", "--T", "5", "--ae-steps", "30", "--chain-steps", "40",
            "--chain-batch", "32", "--module-steps", "2", "--teacher-steps", "10", "--device", "cpu"]
    assert main(["bench", "--protocol", "standard", "--scale", "smoke", "--out", str(tmp_path), "--max-coverage",
                 "--max-coverage-arms", "max_coverage_patent", "max_coverage_random_real", *tiny]) == 0
    doc = json.loads(next(tmp_path.glob("fmnist-standard-*.json")).read_text())
    assert doc["complete"] and doc["protocol"] == "standard"
    arms = {r["arm"] for r in doc["summary"]}
    assert {"ours_patent", "ours", "ours_refined", "random_real", "herding", "k_center", "dm", "full_real",
            "max_coverage_patent", "max_coverage_random_real"} <= arms
    covered = {r["arm"]: r["training_images"] for r in doc["results"] if r["arm"].startswith("max_coverage")}
    pool = doc["max_coverage_arms"]["max_coverage_patent"]["real_latents"]
    assert covered["max_coverage_patent"] == covered["max_coverage_random_real"] >= pool / 5, covered
    assert all(0 <= r["mean"] <= 1 for r in doc["summary"])
    assert (tmp_path / "grids-ipc2" / "ours_refined.png").exists()
    assert "DSA (Zhao & Bilen, ICML 2021)" in next(tmp_path.glob("*.md")).read_text()
