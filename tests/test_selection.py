"""Class plans, selection rules and the n_c/T label (docs/spec.md §1 claims 3-7)."""
import numpy as np
import pytest

from server.condense.selection import plan_and_select, soft_labels
from shared.config import CondenseConfig, StudentConfig

LABELS = np.repeat(np.arange(10), 60)          # 600 latents, 60 per class
np.random.default_rng(0).shuffle(LABELS)


def test_soft_label_is_counts_over_T_and_sums_to_one():
    labels = np.array([0, 0, 1, 2, 2, 2])
    selected = np.array([[0, 1, 2, 3], [3, 4, 5, 5]])
    y = soft_labels(labels, selected, num_classes=4)
    np.testing.assert_allclose(y[0], [2 / 4, 1 / 4, 1 / 4, 0])
    np.testing.assert_allclose(y[1], [0, 0, 1, 0])
    np.testing.assert_allclose(y.sum(1), 1.0)


@pytest.mark.parametrize("T", [10, 20])
def test_random_rule_covers_every_class_in_mixed_plan(T):
    cfg = CondenseConfig(ipc=3, selection="random", class_plan="mixed")
    sel = plan_and_select(LABELS, cfg, T, seed=1)
    assert sel.shape == (30, T)
    for row in sel:
        assert set(LABELS[row]) == set(range(10)), "claim 3: each class chosen at least once"
        assert len(set(row)) == T, "no latent twice within one image"
    y = soft_labels(LABELS, sel, 10)
    assert (y > 0).all() and np.allclose(y.sum(1), 1)


def test_random_rule_refuses_coverage_it_cannot_give():
    with pytest.raises(ValueError, match="T >= classes"):
        plan_and_select(LABELS, CondenseConfig(ipc=1, selection="random", class_plan="mixed"), 5, seed=0)


def test_pure_plan_is_one_class_per_image_with_one_hot_label():
    sel = plan_and_select(LABELS, CondenseConfig(ipc=2, selection="random", class_plan="pure"), 8, seed=0)
    assert sel.shape == (20, 8)
    y = soft_labels(LABELS, sel, 10)
    assert set(np.unique(y)) == {0.0, 1.0}
    assert np.bincount(y.argmax(1), minlength=10).tolist() == [2] * 10


def test_one_to_one_uses_each_latent_once_until_exhausted():
    sel = plan_and_select(LABELS, CondenseConfig(ipc=3, selection="one-to-one", class_plan="pure"), 20, seed=0)
    assert len(np.unique(sel)) == sel.size == 600, "3 x 20 = 60 per class: every latent exactly once"
    for row in sel:
        assert len(set(LABELS[row])) == 1


def test_max_coverage_conditions_every_latent_exactly_once():
    labels = LABELS[:590]                     # 590 = 29.5 groups of 20: one group needs a top-up
    cfg = CondenseConfig(ipc=None, max_coverage=True, selection="one-to-one", class_plan="mixed")
    sel = plan_and_select(labels, cfg, 20, seed=0)
    uses = np.bincount(sel.ravel(), minlength=len(labels))
    assert sel.shape == (30, 20) and (uses >= 1).all()
    assert (uses > 1).sum() == 10, "only the top-up of the last group repeats"
    exact = plan_and_select(LABELS, cfg, 20, seed=0)
    assert (np.bincount(exact.ravel()) == 1).all()


def test_max_coverage_rejects_random_rule():
    with pytest.raises(ValueError, match="one-to-one"):
        plan_and_select(LABELS, CondenseConfig(max_coverage=True, selection="random"), 20, seed=0)


def test_selection_is_deterministic_for_a_seed():
    cfg = CondenseConfig(ipc=2, selection="random", class_plan="mixed")
    a, b, c = (plan_and_select(LABELS, cfg, 12, seed=s) for s in (3, 3, 4))
    assert (a == b).all() and not (a == c).all()


def test_unknown_rule_names_the_choices():
    with pytest.raises(KeyError, match="one-to-one"):
        plan_and_select(LABELS, CondenseConfig(selection="greedy"), 10, seed=0)


def _blobs(per_blob: int = 20, blobs_per_class: int = 3, classes: int = 4, seed: int = 0):
    """Well-separated blobs: blob b of class c sits at a distinct random centre."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(classes * blobs_per_class, 4, 2, 2))
    blob = np.repeat(np.arange(classes * blobs_per_class), per_blob)
    latents = centres[blob] + 0.1 * rng.normal(size=(len(blob), 4, 2, 2))
    order = rng.permutation(len(blob))
    return latents[order].astype(np.float32), (blob // blobs_per_class)[order], blob[order]


def test_cluster_rule_groups_each_mode_into_one_image():
    latents, labels, blob = _blobs()
    sel = plan_and_select(labels, CondenseConfig(ipc=3, selection="cluster"), 20, seed=0, latents=latents)
    assert sel.shape == (12, 20) and len(np.unique(sel)) == sel.size, "disjoint groups"
    for row in sel:
        assert len(set(blob[row])) == 1, "a group is one blob, not a mix of modes"
    assert sorted(blob[sel[:, 0]].tolist()) == list(range(12)), "every mode gets its own image"


def test_cluster_rule_orders_the_nearest_latent_last():
    latents, labels, _ = _blobs()
    sel = plan_and_select(labels, CondenseConfig(ipc=3, selection="cluster"), 20, seed=0, latents=latents)
    for row in sel:
        x = latents[row].reshape(20, -1)
        d = ((x - x.mean(0)) ** 2).sum(1)
        assert d[-1] <= np.median(d), "the latent conditioning the last estimator is among the most central"


def test_cluster_rule_needs_latents_and_one_per_image():
    latents, labels, _ = _blobs()
    with pytest.raises(ValueError, match="needs the latents"):
        plan_and_select(labels, CondenseConfig(ipc=3, selection="cluster"), 20, seed=0)
    with pytest.raises(ValueError, match="lower the budget"):
        plan_and_select(labels, CondenseConfig(ipc=61, selection="cluster"), 20, seed=0, latents=latents)


def test_cluster_rule_reuses_latents_only_when_the_budget_needs_more_than_there_are():
    """60 latents per class, 4 images x T=20 per class: every latent is used, 20 per class twice,
    and no image repeats a latent; with T above the class size an image repeats its nearest ones."""
    latents, labels, _ = _blobs()
    sel = plan_and_select(labels, CondenseConfig(ipc=4, selection="cluster"), 20, seed=0, latents=latents)
    assert sel.shape == (16, 20) and len(np.unique(sel)) == len(labels)
    assert all(len(set(row)) == 20 for row in sel)
    assert all(len(set(labels[row])) == 1 for row in sel), "pure plan: one class per image"
    sel = plan_and_select(labels, CondenseConfig(ipc=1, selection="cluster"), 80, seed=0, latents=latents)
    assert sel.shape == (4, 80) and all(len(set(row)) == 60 for row in sel)


def _reference_kmeans_pp(x, k, rng):
    """The seeding as first written: the blocked version must match it bit for bit."""
    centres = [x[rng.integers(len(x))]]
    d = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d / d.sum() if d.sum() > 0 else None
        centres.append(x[rng.choice(len(x), p=p)])
        d = np.minimum(d, ((x - centres[-1]) ** 2).sum(1))
    return np.stack(centres)


def _reference_capacitated_nearest(dist, T):
    """The greedy as first written: one Python step per (point, centre) pair in distance order."""
    taken, members = np.zeros(dist.shape[0], dtype=bool), [[] for _ in range(dist.shape[1])]
    room = min(dist.shape[0], T * dist.shape[1])
    for flat in np.argsort(dist, axis=None, kind="stable"):
        i, c = divmod(int(flat), dist.shape[1])
        if not taken[i] and len(members[c]) < T:
            taken[i] = True
            members[c].append(i)
            room -= 1
            if not room:
                break
    for c, m in enumerate(members):
        if len(m) < T:
            others = [int(i) for i in np.argsort(dist[:, c], kind="stable") if i not in m] or list(range(len(dist)))
            m += np.resize(others, T - len(m)).tolist()
            m.sort(key=lambda i: dist[i, c])
    return [np.asarray(m[::-1], dtype=np.int64) for m in members]


@pytest.mark.parametrize("n,k,T,decimals", [(2000, 40, 20, 8), (300, 20, 20, 8), (50, 10, 8, 1), (17, 4, 5, 8)])
def test_cluster_rule_helpers_match_the_plain_greedy_bit_for_bit(n, k, T, decimals):
    """The screened greedy and blocked distances pick exactly what the plain loops picked,
    with spare points, with too few (reuse), and with tied distances (rounded duplicates)."""
    from server.condense.selection import _capacitated_nearest, _kmeans_pp
    x = np.random.default_rng(n).standard_normal((n, 16)).round(decimals)
    centres = _kmeans_pp(x, k, np.random.default_rng(3))
    np.testing.assert_array_equal(centres, _reference_kmeans_pp(x, k, np.random.default_rng(3)))
    dist = (x ** 2).sum(1)[:, None] - 2 * x @ centres.T + (centres ** 2).sum(1)[None]
    for got, want in zip(_capacitated_nearest(dist, T, chunk=64), _reference_capacitated_nearest(dist, T)):
        np.testing.assert_array_equal(got, want)


def test_canonical_pool_ignores_arrival_order_and_keeps_provenance():
    import torch

    from server.pipeline import canonical_pool
    from shared.data import ImageSplit
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(300, 4, 2, 2, generator=gen)
    pool = ImageSplit(z, torch.randint(0, 5, (300,), generator=gen), torch.arange(300) * 7)
    a = canonical_pool(pool)
    b = canonical_pool(pool.subset(torch.randperm(300, generator=gen)))    # clients replied in another order
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.ids, b.ids)
    assert (a.labels[1:] >= a.labels[:-1]).all()
    assert torch.equal(a.images, z.half().float()[a.ids // 7]), "each latent keeps its id (at fp16, the wire precision)"


def test_cli_max_coverage_uses_one_to_one_unless_told_otherwise():
    """The default rule is `cluster`, which cannot cover every latent; --max-coverage switches to
    claims 4/7's `one-to-one`, and an explicit incompatible rule is still refused with the reason."""
    from server.cli import build_parser, demo_config
    cfg = demo_config(build_parser().parse_args(["condense", "--out", "x", "--max-coverage"])).condense
    assert cfg.max_coverage and cfg.selection == "one-to-one" and cfg.ipc is None
    assert demo_config(build_parser().parse_args(["condense", "--out", "x"])).condense.selection == "cluster"
    cfg = demo_config(build_parser().parse_args(["condense", "--out", "x", "--max-coverage", "--selection", "random"])).condense
    with pytest.raises(ValueError, match="max_coverage needs selection 'one-to-one'"):
        plan_and_select(LABELS, cfg, 20, seed=0)


def test_cli_guidance_reaches_the_condense_config():
    """`--guidance` sets the teacher guidance weight on demo and condense; absent, the config default holds."""
    from server.cli import build_parser, demo_config
    parse = build_parser().parse_args
    assert demo_config(parse(["condense", "--out", "x", "--guidance", "0"])).condense.guidance == 0.0
    assert demo_config(parse(["demo", "--guidance", "0.1"])).condense.guidance == 0.1
    assert demo_config(parse(["demo"])).condense.guidance == CondenseConfig().guidance > 0
    terms = demo_config(parse(["demo", "--guidance-terms", "label:1"])).condense.guidance_terms
    assert terms == "label:1" and CondenseConfig().guidance_terms != terms
    assert demo_config(parse(["condense", "--out", "x", "--guidance-steps", "7"])).condense.guidance_steps == 7
    assert demo_config(parse(["demo"])).condense.guidance_steps == CondenseConfig().guidance_steps


def test_flower_run_config_sets_guidance_including_off():
    """Deployment's run-config: 0 turns guidance off, and guidance-steps 0 guides every step (not 'the typed
    default', as 0 means for other keys); -1, the pyproject value, keeps the default; the pyproject lists both."""
    import tomllib
    from pathlib import Path
    from server.federation.app import config_from_run_config
    shipped = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config_from_run_config(shipped)[0].condense.guidance == CondenseConfig().guidance
    assert config_from_run_config({**shipped, "guidance": 0})[0].condense.guidance == 0.0
    assert config_from_run_config({**shipped, "guidance": 0.05})[0].condense.guidance == 0.05
    assert config_from_run_config({**shipped, "guidance-terms": "label:1"})[0].condense.guidance_terms == "label:1"
    assert config_from_run_config({**shipped, "guidance-steps": 7})[0].condense.guidance_steps == 7
    assert config_from_run_config({**shipped, "guidance-steps": 0})[0].condense.guidance_steps == 0 != CondenseConfig().guidance_steps
    assert config_from_run_config(shipped)[0].condense.guidance_steps == CondenseConfig().guidance_steps
    assert config_from_run_config({**shipped, "student-steps": 0})[0].student.steps == StudentConfig().steps
