"""The matching objectives (server/condense/matching.py): what each one compares, and that `match`
optimises the one it is given."""
import pytest
import torch

from server.condense.matching import MATCH_OBJECTIVES, class_mean_loss, class_mmd_loss, match, pixel_set
from shared.config import DataConfig
from shared.data import load_dataset


def test_mmd_sees_a_collapsed_set_that_the_class_mean_cannot():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(2, 64, 8, generator=gen)                     # two classes, 64 embeddings each
    classes = torch.tensor([0] * 5 + [1] * 5)
    collapsed = real.mean(1).repeat_interleave(5, 0)               # every image at its class's mean
    spread = torch.cat([real[0, :5], real[1, :5]])                 # real members of each class
    assert class_mean_loss(real, collapsed, classes) < 1e-10
    assert class_mmd_loss(real, collapsed, classes) > 1.5 * class_mmd_loss(real, spread, classes) > 0


def test_mmd_gradient_spreads_a_collapsed_set():
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(1, 128, 4, generator=gen)
    fake = real.mean(1).repeat(10, 1).add(0.01 * torch.randn(10, 4, generator=gen)).requires_grad_(True)
    classes = torch.zeros(10, dtype=torch.long)
    opt = torch.optim.Adam([fake], lr=0.05)
    with torch.no_grad():
        start = float(class_mmd_loss(real, fake, classes))
    for _ in range(150):
        loss = class_mmd_loss(real, fake, classes)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert float(class_mmd_loss(real, fake, classes)) < 0.5 * start
    assert fake.detach().std(0).mean() > 0.5, "the set spreads out towards the real spread (std 1)"


def test_unknown_objective_names_the_choices():
    with pytest.raises(KeyError, match="choose one of: mean, mmd"):
        MATCH_OBJECTIVES["mdm"]


def test_match_optimises_the_mmd_objective():
    ds = load_dataset(DataConfig(public_size=100, train_limit=600, test_limit=10))
    images, labels = ds.private.images, ds.private.labels
    picks = torch.cat([torch.nonzero(labels == c).flatten()[:2] for c in range(10)])
    syn = pixel_set("pixels", images[picks], labels[picks], lr=0.5)
    info = match([syn], images, labels, 10, 30, torch.device("cpu"), real_batch=24, log_every=29,
                 objective="mmd")
    losses = [loss for _, loss in syn.losses]
    assert info["objective"] == "mmd" and len(losses) == 2 and losses[-1] < losses[0], losses


def test_refine_objective_reaches_the_condense_config(tmp_path):
    from server.cli import build_parser
    from server.options import demo_config
    parser = build_parser()
    args = parser.parse_args(["demo", "--refine-objective", "mmd"])
    assert demo_config(args).condense.refine_objective == "mmd"
    demo = next(a for a in parser._subparsers._group_actions[0].choices["demo"]._actions
                if a.dest == "refine_objective")
    assert sorted(demo.choices) == MATCH_OBJECTIVES.names(), "the flag offers exactly the registered objectives"
    recipe = tmp_path / "bad.toml"
    recipe.write_text('inherit = "demo"\n[condense]\nrefine_objective = "median"\n')
    with pytest.raises(KeyError, match="unknown matching objective 'median'; choose one of: mean, mmd"):
        demo_config(parser.parse_args(["demo", "--recipe", str(recipe)]))


def test_standard_bench_rejects_an_unknown_arm_before_any_work(tmp_path):
    from benchmarks.standard import StandardBenchConfig, run_standard_bench
    with pytest.raises(ValueError, match=r"unknown standard-bench arm\(s\) \['ours_refined_mdm'\].*ours_refined_mmd"):
        run_standard_bench(StandardBenchConfig(arms=("ours", "ours_refined_mdm")), tmp_path)
    assert not list(tmp_path.iterdir())


def _small_split(n: int = 600):
    ds = load_dataset(DataConfig(public_size=100, train_limit=n, test_limit=10))
    return ds.private.images, ds.private.labels


def test_idm_refinement_lowers_the_synthetic_cross_entropy_under_trained_networks():
    import torch.nn.functional as F
    from server.condense.embedders import PoolPlan, network_sampler
    images, labels = _small_split(1400)
    plan = PoolPlan(runs=2, steps=20, every=10, batch=64)
    pool = network_sampler("trained", images, labels, 10, 32, torch.device("cpu"), torch.Generator(), seed=0,
                           plan=plan)
    accuracies = pool.accuracies
    assert len(accuracies) == plan.runs * (plan.steps // plan.every + 1)
    assert max(accuracies[0], accuracies[3]) < 35, "step 0 of each run is an untrained network"
    assert min(accuracies[2], accuracies[5]) > 50, f"20 steps learn the classes: {accuracies}"
    assert not torch.equal(pool.snapshots[0][0]["features.0.weight"], pool.snapshots[3][0]["features.0.weight"])

    net = pool.net
    net.load_state_dict(pool.snapshots[-1][0])
    picks = torch.cat([torch.nonzero(labels == c).flatten()[:2] for c in range(10)])
    start = images[picks] + 0.8 * torch.randn(images[picks].shape, generator=torch.Generator().manual_seed(3))

    def ce(x):
        return float(F.cross_entropy(net(x), labels[picks]))

    syn = pixel_set("pixels", start, labels[picks], lr=0.5)
    info = match([syn], images, labels, 10, 15, torch.device("cpu"), real_batch=24, width=32, log_every=14,
                 networks="trained", ce_weight=0.5, pool=plan)       # seed 0: the same pool as above
    assert info["networks"] == "trained" and info["pool_accuracies"] == accuracies
    assert ce(syn.params.detach()) < 0.7 * ce(start), (ce(start), ce(syn.params.detach()))


def test_the_class_aware_term_needs_trained_networks():
    from server.cli import build_parser
    from server.options import demo_config
    images, labels = _small_split()
    syn = pixel_set("pixels", images[:20], labels[:20])
    with pytest.raises(ValueError, match="needs trained matching networks.*--refine-networks trained"):
        match([syn], images, labels, 10, 1, torch.device("cpu"), ce_weight=0.5)
    parser = build_parser()
    with pytest.raises(ValueError, match="needs trained matching networks"):
        demo_config(parser.parse_args(["demo", "--refine-ce-weight", "0.5"]))
    cfg = demo_config(parser.parse_args(["demo", "--refine-networks", "trained", "--refine-ce-weight", "0.5"]))
    assert (cfg.condense.refine_networks, cfg.condense.refine_ce_weight) == ("trained", 0.5)
    from server.condense.embedders import NETWORKS
    flag = next(a for a in parser._subparsers._group_actions[0].choices["condense"]._actions
                if a.dest == "refine_networks")
    assert tuple(flag.choices) == NETWORKS, "the flag offers exactly the networks the sampler knows"


def test_the_idm_arm_takes_idms_class_aware_weight_per_ipc():
    from benchmarks.standard import OURS, idm_ce_weight
    assert OURS["ours_refined_idm"]["refine_networks"] == "trained"
    assert (idm_ce_weight(1), idm_ce_weight(10), idm_ce_weight(50)) == (0.5, 0.5, 0.1)



def test_central_dp_refuses_trained_matching_networks():
    from server.cli import build_parser
    from server.options import demo_config
    args = build_parser().parse_args(["demo", "--central-epsilon", "10", "--refine-networks", "trained"])
    with pytest.raises(ValueError, match="--central-epsilon fits the set to the released class-mean.*Drop --refine-networks"):
        demo_config(args)
