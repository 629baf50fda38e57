"""Model shapes for both layouts, chain determinism, save/load (docs/spec.md §1 claims 1-2)."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from server.condense.chain import SyntheticSet, condense
from shared.config import CondenseConfig
from shared.models.noise_estimators import NoiseEstimators, make_scheduler


def test_first_encoder_and_decoder_shapes(tiny_models):
    _, m = tiny_models
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    z = m["first_encoder"](x)
    assert z.shape == (3, 4, 8, 8)
    y = m["decoder"](z)
    assert y.shape == x.shape and y.abs().max() <= 1


def test_decoder_finetuning_keeps_the_first_encoder_and_lowers_reconstruction_error():
    """The decoder-only stage after joint training: E1 (hence every latent) is bit-identical with or
    without it, and the decoder reconstructs held-out images better."""
    import torch.nn.functional as F
    from server.condense.pretrain import train_autoencoder
    from shared.config import AutoencoderConfig
    g = torch.Generator().manual_seed(0)
    prototypes = torch.rand(8, 1, 32, 32, generator=g) * 2 - 1         # 8 patterns, 40 noisy copies each
    images = (prototypes.repeat(40, 1, 1, 1) + 0.1 * torch.randn(320, 1, 32, 32, generator=g)).clamp(-1, 1)
    held_out = (prototypes.repeat(8, 1, 1, 1) + 0.1 * torch.randn(64, 1, 32, 32, generator=g)).clamp(-1, 1)
    cfg = AutoencoderConfig(encoder_channels=(8, 16), decoder_channels=(16, 8, 8), steps=30, batch_size=32)
    dev = torch.device("cpu")
    e_plain, d_plain = train_autoencoder(images, replace(cfg, decoder_finetune=0), dev)
    e_tuned, d_tuned = train_autoencoder(images, replace(cfg, decoder_finetune=3), dev)
    for a, b in zip(e_plain.state_dict().values(), e_tuned.state_dict().values()):
        assert torch.equal(a, b)
    with torch.no_grad():
        z = e_plain(held_out)
        plain, tuned = F.mse_loss(d_plain(z), held_out).item(), F.mse_loss(d_tuned(z), held_out).item()
    assert tuned < 0.9 * plain, (plain, tuned)


@pytest.mark.parametrize("layout,modules", [("separate", 5), ("shared", 1)])
def test_chain_layouts(layout, modules):
    est = NoiseEstimators(5, layout, 4, 8, (16, 32), 32)
    assert len(est.estimators) == modules
    z, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 32)
    for t in range(5):
        assert est(z, t, cond).shape == z.shape
    if layout == "separate":
        assert est.estimator(0) is not est.estimator(4)
    else:
        assert est.estimator(0) is est.estimator(4)
    with pytest.raises(IndexError):
        est.estimator(5)


def test_scheduler_visits_every_step_once():
    for sampler in ("ddim", "ddpm"):
        assert make_scheduler(20, "squaredcos_cap_v2", sampler).timesteps.tolist() == list(range(19, -1, -1))


def _teacher(models):
    from server.distill.teacher import Teacher
    torch.manual_seed(0)
    return Teacher(models["first_encoder"], models["second_encoder"], 4).eval()


def _condense(tiny_models, seed, teacher=True, **kw):
    chain_cfg, models = tiny_models
    g = torch.Generator().manual_seed(0)
    latents, labels = torch.randn(80, 4, 8, 8, generator=g), torch.arange(80) % 4
    cfg = CondenseConfig(ipc=2, seed=seed, batch_size=3, **kw)
    models = {**models, "teacher": _teacher(models)} if teacher else models
    return condense(latents, labels, torch.arange(1000, 1080), 4, models, chain_cfg, cfg, torch.device("cpu"))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_guidance_raises_the_teachers_probability_of_each_label(tiny_models, sampler):
    """Teacher guidance: same conditioning and noise draws; the guided final latents are
    more likely under the teacher for their own labels, and guidance 0 is the plain chain."""
    import torch.nn.functional as F
    teacher = _teacher(tiny_models[1])
    plain = _condense(tiny_models, 3, teacher=False, sampler=sampler, guidance=0.0)
    assert torch.equal(plain.images, _condense(tiny_models, 3, sampler=sampler, guidance=0.0).images)
    guided = _condense(tiny_models, 3, sampler=sampler, guidance=0.5, guidance_terms="label:1")
    assert torch.equal(plain.conditioning, guided.conditioning)
    with torch.no_grad():
        log_p = [(s.labels * F.log_softmax(teacher.classify_latents(s.latents), 1)).sum(1) for s in (plain, guided)]
    assert (log_p[1] > log_p[0]).float().mean() >= 0.75 and log_p[1].mean() > log_p[0].mean() + 0.1, log_p


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_representative_guidance_pulls_towards_the_conditioning_group(tiny_models, sampler):
    """The `representative` term: the guided final latents' teacher tokens sit closer to the
    mean tokens of their own T conditioning latents than the unguided ones do."""
    teacher = _teacher(tiny_models[1])
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(80, 4, 8, 8, generator=g)
    plain = _condense(tiny_models, 3, sampler=sampler, guidance=0.0)
    guided = _condense(tiny_models, 3, sampler=sampler, guidance=0.5, guidance_terms="representative:1")
    with torch.no_grad():
        target = torch.stack([teacher.second_encoder(latents[plain.conditioning[:, k] - 1000]).flatten(1)
                              for k in range(plain.conditioning.shape[1])]).mean(0)
        dist = [(teacher.second_encoder(s.latents).flatten(1) - target).pow(2).sum(1) for s in (plain, guided)]
    assert (dist[1] < dist[0]).float().mean() >= 0.75 and dist[1].mean() < 0.8 * dist[0].mean(), dist


def test_guidance_steps_guide_only_the_chains_last_steps(tiny_models):
    """`guidance_steps` N: the guide is called at the last N steps only (t = N-1 .. 0); N = T, or
    above it (the default 10 on a shorter chain), is every step, bit for bit the same as 0;
    a negative N is refused."""
    from server.condense.chain import run_chain
    chain_cfg, models = tiny_models
    cond = torch.randn(3, chain_cfg.T, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def sample(steps):
        calls = []
        def guide(z0):
            calls.append(len(calls))
            return torch.ones_like(z0)
        cfg = CondenseConfig(guidance=0.1, guidance_steps=steps)
        images, _ = run_chain(cond, models["first_encoder"], models["second_encoder"], models["noise_estimators"],
                              models["decoder"], chain_cfg, cfg, torch.Generator().manual_seed(0), guide)
        return images, len(calls)

    every, n_every = sample(0)
    assert n_every == chain_cfg.T
    for steps in (chain_cfg.T, chain_cfg.T + 1, 10):
        same, n_same = sample(steps)
        assert n_same == chain_cfg.T and torch.equal(every, same)
    last_two, n_two = sample(2)
    assert n_two == 2 and not torch.equal(every, last_two)
    with pytest.raises(ValueError, match="guidance_steps must be >= 0"):
        _condense(tiny_models, 0, guidance=0.05, guidance_steps=-1)


def test_guidance_needs_a_teacher_and_a_sane_weight(tiny_models):
    with pytest.raises(ValueError, match="needs the server's teacher"):
        _condense(tiny_models, 0, teacher=False, guidance=0.05)
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="guidance must be a finite number"):
            _condense(tiny_models, 0, guidance=bad)
    for bad in ("label:-1", "label:0,representative:0", "label:nan"):
        with pytest.raises(ValueError, match="guidance terms need finite weights"):
            _condense(tiny_models, 0, guidance=0.05, guidance_terms=bad)
    with pytest.raises(KeyError, match="unknown guidance term 'lable'; choose one of: label, representative"):
        _condense(tiny_models, 0, guidance=0.05, guidance_terms="lable:1")


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_condense_is_deterministic_for_a_seed(tiny_models, sampler):
    a, b, c = (_condense(tiny_models, s, sampler=sampler, selection="random") for s in (7, 7, 8))
    assert a.images.shape == (8, 1, 32, 32) and a.conditioning.shape == (8, 4)
    assert torch.equal(a.images, b.images) and torch.equal(a.conditioning, b.conditioning)
    assert not torch.equal(a.images, c.images)


def test_condense_manifest_and_roundtrip(tiny_models, tmp_path):
    syn = _condense(tiny_models, 0, class_plan="mixed", selection="random", noise_init="preset")
    assert torch.allclose(syn.labels.sum(1), torch.ones(len(syn)))
    assert (syn.conditioning >= 1000).all(), "manifest records real latent ids, not positions"
    syn.save(tmp_path, None)
    assert (tmp_path / "grid.png").stat().st_size > 0
    back = SyntheticSet.load(tmp_path)
    assert torch.equal(back.images, syn.images) and torch.equal(back.conditioning, syn.conditioning)
    assert back.meta["T"] == 4


def test_each_step_is_conditioned_on_its_own_latent(tiny_models):
    """Changing the latent bound to one estimator changes the output (the condition is used)."""
    from server.condense.chain import run_chain
    chain_cfg, m = tiny_models
    cond = torch.randn(1, 4, 4, 8, 8)
    cfg = CondenseConfig(guidance=0.0)
    base, _ = run_chain(cond, m["first_encoder"], m["second_encoder"], m["noise_estimators"], m["decoder"],
                        chain_cfg, cfg, torch.Generator().manual_seed(0))
    cond2 = cond.clone()
    cond2[:, 2] = torch.randn(4, 8, 8)
    other, _ = run_chain(cond2, m["first_encoder"], m["second_encoder"], m["noise_estimators"], m["decoder"],
                         chain_cfg, cfg, torch.Generator().manual_seed(0))
    assert not torch.allclose(base, other)


def test_models_save_and_load(tiny_models, tmp_path):
    """Every model must round-trip through save_pretrained (the cache depends on it)."""
    _, models = tiny_models
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
        back = type(model).from_pretrained(tmp_path / name)
        for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
            assert torch.equal(a, b), f"{name}.{k} changed on reload"


class _OracleEstimators(torch.nn.Module):
    """Returns the exact noise (or velocity) that separates z_t from a known z_0, as a perfect estimator would."""

    def __init__(self, z0, T, prediction):
        super().__init__()
        self.z0, self.sched = z0, make_scheduler(T, "squaredcos_cap_v2", "ddpm", prediction=prediction)

    def forward(self, z_t, t, cond):
        a = self.sched.alphas_cumprod[t]
        eps = (z_t - a.sqrt() * self.z0) / (1 - a).sqrt()
        if self.sched.config.prediction_type == "v_prediction":
            return a.sqrt() * eps - (1 - a).sqrt() * self.z0
        return eps


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_chain_reads_the_estimators_output_as_configured(tiny_models, prediction):
    """With perfect estimators the DDIM chain lands on their z_0, for either output type: the sampler
    interprets the estimators' output the way training defined it (a mismatch lands elsewhere)."""
    from dataclasses import replace
    from server.condense.chain import run_chain
    chain_cfg, m = tiny_models
    chain_cfg = replace(chain_cfg, prediction=prediction)
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-2.5, 2.5)
    oracle = _OracleEstimators(z0, chain_cfg.T, prediction)
    land = lambda cfg: run_chain(torch.randn(2, cfg.T, 4, 8, 8), m["first_encoder"], torch.nn.Identity(), oracle,
                                 m["decoder"], cfg, CondenseConfig(), torch.Generator().manual_seed(0))[1]
    assert torch.allclose(land(chain_cfg), z0, atol=1e-3)
    wrong = replace(chain_cfg, prediction="epsilon" if prediction == "v_prediction" else "v_prediction")
    assert not torch.allclose(land(wrong), z0, atol=1e-1)


def test_unknown_prediction_is_a_clear_error():
    with pytest.raises(ValueError, match="v_prediction"):
        make_scheduler(5, "squaredcos_cap_v2", prediction="x0")


def test_concurrent_runs_build_a_shared_checkpoint_once(tmp_path, monkeypatch, capsys):
    """Two runs sharing one cache ask for the same autoencoder at once (threads here: flock holds between
    open files, in one process or two): one trains it, the other waits and loads it. Without the lock
    both trained it and raced to rename the same temporary folder."""
    import threading
    import time
    import server.condense.pretrain as pretrain
    from shared.config import AutoencoderConfig
    monkeypatch.setenv("FEDCONDENSE_CACHE", str(tmp_path))
    train = pretrain.train_autoencoder
    monkeypatch.setattr(pretrain, "train_autoencoder", lambda *args: (time.sleep(1), train(*args))[1])
    images = torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = AutoencoderConfig(encoder_channels=(8, 16), decoder_channels=(16, 8, 8), steps=4, batch_size=16)
    results = []
    run = lambda: results.append(pretrain.load_or_train_autoencoder(images, cfg, torch.device("cpu")))
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(info["trained"] for _, _, info in results) == [False, True]
    (a, _, _), (b, _, _) = results
    assert torch.equal(a.conv_out.weight, b.conv_out.weight), "the waiting run loads the checkpoint the other built"
    assert [p.name.split("-")[0] for p in tmp_path.iterdir() if p.is_dir()] == ["autoencoder"]
    assert "waiting for another process building autoencoder-" in capsys.readouterr().err


def test_a_moved_cache_still_loads_its_separate_chain(tmp_path, monkeypatch):
    """A `separate` chain entry names the shared entry holding its E2 by name, not by absolute path: a
    cache moved (or copied onto another machine) loads the same weights and trains nothing."""
    import shutil
    import server.condense.pretrain as pretrain
    from shared.config import ChainConfig
    old, new = tmp_path / "old", tmp_path / "new"
    monkeypatch.setenv("FEDCONDENSE_CACHE", str(old))
    latents = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = ChainConfig(T=3, unet_channels=(16, 32), second_encoder_channels=32, cross_attention_dim=32,
                      condition_tokens=4, shared_steps=2, module_steps=1, batch_size=16)
    e2, est, info = pretrain.load_or_train_chain(latents, cfg, torch.device("cpu"))
    shutil.move(old, new)
    monkeypatch.setenv("FEDCONDENSE_CACHE", str(new))
    for name in ("train_shared", "finetune_separate"):
        monkeypatch.setattr(pretrain, name, lambda *a: pytest.fail("the moved cache retrained the chain"))
    e2b, estb, infob = pretrain.load_or_train_chain(latents, cfg, torch.device("cpu"))
    assert infob["path"].startswith(str(new)) and infob["path"].endswith(info["path"].rsplit("/", 1)[1])
    for a, b in zip([*e2.parameters(), *est.parameters()], [*e2b.parameters(), *estb.parameters()]):
        assert torch.equal(a, b)
    entry = Path(infob["path"])
    shared = next(p for p in new.iterdir() if p.is_dir() and p != entry)
    shutil.rmtree(shared)
    with pytest.raises(FileNotFoundError, match="copy that entry along"):
        pretrain.load_chain(entry, torch.device("cpu"))


def test_separate_modules_do_not_depend_on_what_the_process_ran_before(tmp_path, monkeypatch):
    """The per-module fine-tuning seeds its own noise: with the shared estimator already cached (a resumed
    run, or one with other module steps) it builds the checkpoint that a cold run, training both in one
    go, builds, rather than drawing from wherever the global generator stood."""
    import shutil
    import server.condense.pretrain as pretrain
    from shared.config import ChainConfig
    monkeypatch.setenv("FEDCONDENSE_CACHE", str(tmp_path))
    latents = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = ChainConfig(T=3, unet_channels=(16, 32), second_encoder_channels=32, cross_attention_dim=32,
                      condition_tokens=4, shared_steps=2, module_steps=2, batch_size=16)
    _, cold, info = pretrain.load_or_train_chain(latents, cfg, torch.device("cpu"))
    shutil.rmtree(info["path"])                      # keep the shared entry only
    torch.randn(1000)                                # whatever else the process did before
    _, resumed, _ = pretrain.load_or_train_chain(latents, cfg, torch.device("cpu"))
    for a, b in zip(cold.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    first, last = cold.estimators[0].state_dict(), cold.estimators[2].state_dict()
    assert any(not torch.equal(v, last[k]) for k, v in first.items()), \
        "both modules start as the shared estimator; fine-tuned on their own steps, they must differ"
