"""Smoke test of the bench harness at tiny scale: JSON, plot, table from the JSON."""
import json
from dataclasses import replace

import pytest
import torch

from server.cli import main
from shared.config import StudentConfig

# Same data and chain settings as tests/test_demo_e2e.py: the chain comes from the session cache.
TINY = ["--train-limit", "1500", "--test-limit", "500", "--T", "5", "--ae-steps", "30", "--chain-steps", "40",
        "--chain-batch", "32", "--module-steps", "2", "--student", "convnet3_w32", "--student-steps", "20", "--teacher-steps", "10", "--device", "cpu"]


def test_bench_smoke(tmp_path):
    out = tmp_path / "results"
    assert main(["bench", "--out", str(out), "--scale", "smoke", *TINY]) == 0
    files = sorted(out.glob("*.json"))
    assert len(files) == 1 and files[0].with_suffix(".png").stat().st_size > 5000
    doc = json.loads(files[0].read_text())
    arms = {r["arm"] for r in doc["summary"]}
    assert arms == {"ours", "random_real", "dm", "full_real"}
    for r in doc["summary"]:
        assert 0 <= r["mean"] <= 1
    ours = next(r for r in doc["summary"] if r["arm"] == "ours")
    dm = next(r for r in doc["summary"] if r["arm"] == "dm")
    assert ours["condense_seconds"] > 0 and dm["condense_seconds"] > 0
    assert doc["client"]["uplink_bytes_per_image"] < doc["client"]["raw_bytes_per_image"]
    assert [r["real_latents"] for r in doc["scaling"]["vs_real_latents"]] == [200, 500]
    assert [r["synthetic_images"] for r in doc["scaling"]["vs_T"]] == [100], "the smoke scale times 100 images"
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:start -->\nold\n<!-- bench:end -->\nrest\n")
    assert main(["bench-table", str(files[0]), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "| dm | 1 |" in text and text.endswith("rest\n")
    assert doc["student_loss"] == StudentConfig.loss and 0 <= doc["teacher"]["accuracy"] <= 1, "arms share the KD recipe"
    check_merge(files[0], tmp_path)


def check_merge(first, tmp_path):
    """A second run of the same recipe (another seed, one arm re-run) merges into one table; an
    incompatible run is refused."""
    doc = json.loads(first.read_text())
    second = json.loads(json.dumps(doc))
    second["config"]["seeds"] = [1]
    second["results"] = [{**r, "seed": 1, "accuracy": 0.5} for r in doc["results"] if r["arm"] in ("ours", "dm")]
    (tmp_path / "b.json").write_text(json.dumps(second))
    merged_path = tmp_path / "merged.json"
    assert main(["bench-table", str(first), str(tmp_path / "b.json"), "--merged-out", str(merged_path)]) == 0
    merged = json.loads(merged_path.read_text())
    seeds = {r["arm"]: r["seeds"] for r in merged["summary"]}
    assert seeds == {"ours": 2, "dm": 2, "random_real": 1, "full_real": 1}
    assert not merged["complete"] and merged_path.with_suffix(".png").exists()   # random_real lacks seed 1
    from benchmarks.harness import markdown_table, merge_runs
    assert "random_real IPC 1 (1/2 seeds)" in markdown_table(merged)
    second["config"]["student"]["steps"] += 1
    with pytest.raises(ValueError, match="different 'student' settings"):
        merge_runs([doc, second])


def test_bench_rejects_unknown_arms_before_any_work(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path), "--scale", "smoke", "--arms", "ours", "dn", *TINY]) == 2
    assert "unknown bench arm(s) ['dn']" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_scaling_sizes_cut_to_the_pool():
    """`--scale full` with `--train-limit` asks for pool sizes beyond the pool: they are cut to it
    (this once crashed the scaling curve with an IndexError)."""
    from benchmarks.harness import scaling_sizes
    assert scaling_sizes((1000, 5000, 20000, 0), 600) == [600]
    assert scaling_sizes((1000, 5000, 20000, 0), 54000) == [1000, 5000, 20000, 54000]
    assert scaling_sizes((200, 0), 1500) == [200, 1500]


@pytest.mark.slow       # `make test-all` (~1 min, mostly process start-up); tests/test_federation_sim.py keeps a real fleet in `make test`
def test_federation_bench_measures_each_fleet_size(tmp_path):
    """Two real simulated collections (2 and 4 clients, fresh processes): every client pooled, the first
    encoder sent once per client, the server's and the workers' memory measured, a plot and a table."""
    import json
    from benchmarks.federation import FederationBenchConfig, markdown, run_federation_bench
    path = run_federation_bench(FederationBenchConfig(clients=(2, 4), splits=("iid",), train_limit=400), tmp_path)
    doc = json.loads(path.read_text())
    rows = {r["clients"]: r for r in doc["rows"]}
    assert all(r["accepted"] == n and r["encoder_sends"] == n and r["pooled_latents"] == 400 for n, r in rows.items())
    assert rows[4]["request_bytes"] > 1.8 * rows[2]["request_bytes"], "E1 goes to every node once"
    assert all(r["server_peak_rss_mb"] > 100 and r["worker_peak_rss_mb"] > 100 and r["workers"] >= 1
               for r in rows.values())
    assert doc["growth"][0]["clients_ratio"] == 2 and path.with_suffix(".png").exists()
    assert "| iid | 4 | 4 |" in markdown(doc)


@pytest.mark.slow       # `make test-all` (~3 min); `make test` keeps the central curve's two tests below
def test_privacy_curve_scores_each_epsilon_and_group_size(tmp_path):
    """The local-DP curve at tiny scale: each (epsilon, k) point releases through the device's own function,
    condenses the filtered pool with a chain trained on the public split, and is scored beside the
    released records and the no-DP and public-only references; JSON, plot and table."""
    from benchmarks.privacy_curve import markdown, summary
    out = tmp_path / "results"
    assert main(["bench", "--privacy-curve", "--out", str(out), "--epsilons", "8", "--group-sizes", "1", "2",
                 "--ipc", "2", "--seeds", "0", "--evaluators", "1", "--epochs", "2", *TINY]) == 0
    files = sorted(out.glob("fmnist-privacy-curve-*.json"))
    assert len(files) == 1 and files[0].with_suffix(".png").stat().st_size > 5000
    doc = json.loads(files[0].read_text())
    points = {(str(p["epsilon"]), p["group_size"]) for p in doc["points"]}
    assert points == {("inf", 1), ("0", 0), ("8.0", 1), ("8.0", 2)}
    noised = [p for p in doc["points"] if p["epsilon"] == 8.0]
    assert all(p["epsilon_pld"] <= 8.0 and p["chain_trained_on"].startswith("public") for p in noised)
    by_k = {p["group_size"]: p["released"] for p in noised}
    assert by_k[2] < by_k[1], "group means release fewer values"
    arms = {(r["epsilon"], r["group_size"], r["arm"]) for r in summary(doc)}
    assert {("8.0", 1, "ours"), ("8.0", 2, "released_real"), ("inf", 1, "random_real"), ("0", 0, "public_only")} <= arms
    assert "public split alone" in markdown(doc)


def test_central_privacy_curve_fits_the_public_chain_to_one_release(tmp_path):
    """The central-DP curve at tiny scale: the public split's chain sets fitted to the pool's one release at
    each epsilon and without noise, beside the public split alone and a random real subset."""
    from benchmarks.privacy_curve import markdown, summary
    out = tmp_path / "results"
    assert main(["bench", "--privacy-curve", "--threat-model", "central", "--out", str(out), "--epsilons", "2",
                 "--central-iterations", "3", "--ipc", "2", "--seeds", "0", "--evaluators", "1", "--epochs", "2",
                 "--central-arms", "ours", "--with-teacher-kd", *TINY]) == 0
    files = sorted(out.glob("fmnist-privacy-curve-central-dp-*.json"))
    assert len(files) == 1 and files[0].with_suffix(".png").stat().st_size > 5000
    doc = json.loads(files[0].read_text())
    assert doc["threat_model"].startswith("trusted server") and doc["complete"]
    noised = next(p for p in doc["points"] if p["epsilon"] == 2.0)
    assert noised["epsilon_pld"] <= 2.0 and noised["noise_multiplier"] > 0 and noised["released"]["records"] == 1500
    assert files[0].name.startswith("fmnist-privacy-curve-central-dp-ours-ipc2-"), "a non-default IPC names its file"
    arms = {(r["epsilon"], r["arm"]) for r in summary(doc)}
    standard = {("inf", "random_real"), ("0", "public_only"), ("inf", "central"), ("2.0", "central")}
    assert arms == standard | {(eps, arm + "_kd") for eps, arm in standard}, "every set also by the teacher-KD student"
    kd = [r for r in doc["results"] if r.get("protocol") == "teacher-kd"]
    assert len(kd) == 4 and all(0 < r["mean"] <= 1 and r["loss"] == "soft_ce:0.25,kd:1" for r in kd)
    assert "labels inside the guarantee" in markdown(doc) and "teacher-KD student" in markdown(doc)


def configs_seen(monkeypatch, module, runner: str, commands: list) -> list:
    """The config each command hands to `module.runner`, stopped there before any work."""
    seen = []

    def capture(cfg, out):
        seen.append(cfg)
        raise KeyboardInterrupt
    monkeypatch.setattr(module, runner, capture)
    for argv in commands:
        with pytest.raises(KeyboardInterrupt):
            main(argv)
    return seen


def test_skip_unnoised_leaves_out_the_reference_fit(monkeypatch, tmp_path):
    """`--skip-unnoised` reaches the curve's config as `unnoised=False`; without it the reference fit stays."""
    import benchmarks.privacy_curve as curve
    base = ["bench", "--privacy-curve", "--threat-model", "central", "--out", str(tmp_path), "--epsilons", "10"]
    seen = configs_seen(monkeypatch, curve, "run_privacy_curve", [base, [*base, "--skip-unnoised"]])
    assert [cfg.unnoised for cfg in seen] == [True, False]


def test_light_lr_reaches_the_native_bench(monkeypatch, tmp_path):
    """`--light-lr` sets the ShuffleNet / MobileNet students' learning rate; without it mdistiller's 0.01 stays."""
    import benchmarks.distill_native as native
    base = ["bench", "--distill-native", "--students", "shufflenet_v2_x05", "--out", str(tmp_path)]
    seen = configs_seen(monkeypatch, native, "run_native_distill", [base, [*base, "--light-lr", "0.05"]])
    assert [native.student_config(cfg, "shufflenet_v2_x05", 0, 1).lr for cfg in seen] == [0.01, 0.05]
    assert [cfg.lr for cfg in seen] == [0.05, 0.05]


def test_central_curve_runs_dp_merf_and_dp_sgd_at_each_epsilon(tmp_path):
    """The central curve's DP baselines at tiny scale: DP-MERF sampled at the curve's IPC and DP-SGD (Opacus)
    on the private images, each calibrated to the epsilon of its point, beside a random real subset."""
    from benchmarks.dp_merf import DPMERFConfig
    from benchmarks.dp_sgd import DPSGDConfig
    from benchmarks.privacy_curve import PrivacyCurveConfig, markdown, run_privacy_curve, summary
    from shared.config import AutoencoderConfig, DataConfig, DemoConfig
    demo = DemoConfig(data=DataConfig(train_limit=1500, test_limit=300), autoencoder=AutoencoderConfig(steps=30),
                      device="cpu")
    cfg = PrivacyCurveConfig(threat_model="central", central_arms=("dp_merf", "dp_sgd"), epsilons=(1.0, 8.0), ipc=2,
                             seeds=(0,), evaluators=1, epochs=2, demo=demo,
                             dp_merf=DPMERFConfig(features=200, epochs=1, batches_per_epoch=15, batch=20),
                             dp_sgd=DPSGDConfig(batch_size=256, epochs=2))
    doc = json.loads(run_privacy_curve(cfg, tmp_path).read_text())
    assert {(r["epsilon"], r["arm"]) for r in summary(doc)} == {
        ("inf", "random_real"), ("1.0", "dp_merf"), ("8.0", "dp_merf"), ("1.0", "dp_sgd"), ("8.0", "dp_sgd")}
    sgd = {p["epsilon"]: p for p in doc["points"] if p.get("arm") == "dp_sgd"}
    for eps, p in sgd.items():
        assert eps * 0.9 < p["epsilon_spent"] <= eps * 1.01 and p["records"] == 1500 and p["steps"] > 0
    assert sgd[1.0]["noise_multiplier"] > sgd[8.0]["noise_multiplier"] > 0
    merf = {p["epsilon"]: p for p in doc["points"] if p.get("arm") == "dp_merf"}
    assert merf[1.0]["noise_multiplier"] > merf[8.0]["noise_multiplier"] > 0
    assert merf[1.0]["runs"][0]["noise_std_on_mean"] == pytest.approx(merf[1.0]["noise_multiplier"] / 1500)
    assert "DP-MERF" in markdown(doc) and "DP-SGD" in markdown(doc)


def test_distill_native_bench_pairs_every_method_with_kd(tmp_path):
    """The native-setting bench at tiny scale: a teacher trained on all training images, students on a
    real subset per seed, each method's paired difference to KD, a trace of every term, JSON, table, plot."""
    from benchmarks.distill_native import NativeDistillConfig, markdown, run_native_distill
    from shared.config import DataConfig
    cfg = NativeDistillConfig(data=DataConfig(test_limit=200), teacher_steps=8, per_class=2, steps=6,
                              methods=("ce", "kd", "dkd", "ddkd"), seeds=(0, 1), device="cpu")
    path = run_native_distill(cfg, tmp_path)
    doc = json.loads(path.read_text())
    assert doc["teacher"]["train_images"] == 60000 and path.with_suffix(".png").stat().st_size > 5000
    assert {(r["method"], r["seed"]) for r in doc["rows"]} == {(m, s) for m in cfg.methods for s in (0, 1)}
    ddkd = next(r for r in doc["rows"] if r["method"] == "ddkd")
    assert set(ddkd["trace"][0]["terms"]) == {"soft_ce", "dkd", "ddkd"} and ddkd["trace"][0]["grad_norm"] > 0
    rows = {r["method"]: r for r in doc["summary"]}
    assert rows["kd"]["vs_kd"] is None and rows["ddkd"]["vs_kd"]["n"] == 2
    gap = [a - b for a, b in zip(rows["dkd"]["accuracies"], rows["kd"]["accuracies"])]
    assert rows["dkd"]["vs_kd"]["mean"] == pytest.approx(sum(gap) / 2)
    assert "| convnet3_w32 | ddkd |" in markdown(doc)
    # a later run of some methods in the same setting replaces their rows and keeps the others'
    again = run_native_distill(replace(cfg, methods=("kd", "channel_sparse")), tmp_path)
    merged = json.loads(again.read_text())
    assert again == path and merged["config"]["methods"] == ["ce", "kd", "dkd", "ddkd", "channel_sparse"]
    assert {(r["method"], r["seed"]) for r in merged["rows"]} == \
        {(m, s) for m in (*cfg.methods, "channel_sparse") for s in (0, 1)}
    kd = lambda d: [r["accuracy"] for r in d["rows"] if r["method"] == "kd"]
    assert kd(merged) == kd(doc)                                     # paired seeds reproduce a row exactly
    assert {r["method"] for r in merged["summary"]} == set(merged["config"]["methods"])
    # a run in another setting leaves the file as it is and writes beside it
    other = run_native_distill(replace(cfg, methods=("kd",), steps=4), tmp_path)
    assert other != path and json.loads(path.read_text()) == merged
    assert json.loads(other.read_text())["config"]["methods"] == ["kd"]


def test_distill_synthetic_bench_pairs_every_method_with_soft_labels_and_kd(tmp_path):
    """The synthetic-set bench at tiny scale, through the CLI: condensed sets per seed, the server's teacher,
    every method's paired difference to the soft-label baseline and to KD, a feature term on top of KD."""
    from benchmarks.distill_synthetic import markdown
    from server.cli import main
    tiny = ["--train-limit", "1500", "--test-limit", "200", "--T", "5", "--ae-steps", "30", "--chain-steps", "40",
            "--chain-batch", "32", "--module-steps", "2", "--teacher-steps", "10", "--device", "cpu"]
    methods = ["ce", "kd", "dkd", "channel_sparse+kd"]
    assert main(["bench", "--distill-synthetic", "--methods", *methods, "--seeds", "0", "1", "--ipc", "2",
                 "--student-steps", "4", "--refine-iterations", "2", "--out", str(tmp_path), *tiny]) == 0
    path = next(tmp_path.glob("fmnist-distill-synthetic-ipc2-*.json"))
    doc = json.loads(path.read_text())
    students = ("convnet3", "convnet3_w32")
    assert {(r["student"], r["method"], r["seed"]) for r in doc["rows"]} == \
        {(n, m, s) for n in students for m in methods for s in (0, 1)}
    assert {r["set"] for r in doc["rows"]} == {"ours_refined|ipc2|s0", "ours_refined|ipc2|s1"}
    stacked = next(r for r in doc["rows"] if r["method"] == "channel_sparse+kd" and r["student"] == "convnet3_w32")
    hint, first_task_row = stacked["trace"][:2]       # the hint stage runs first and traces one row
    assert hint["stage"] == "hint" and set(first_task_row["terms"]) == {"soft_ce", "kd", "channel_sparse"}
    # the tiny teacher's features have 64 channels: too few to match the 128 of a width-128 student
    assert [(n["student"], n["method"]) for n in doc["not_applicable"]] == [("convnet3", "channel_sparse+kd")]
    rows = {(r["student"], r["method"]): r for r in doc["summary"]}
    assert rows["convnet3", "ce"]["vs_ce"] is None and rows["convnet3", "kd"]["vs_kd"] is None
    assert rows["convnet3_w32", "dkd"]["vs_ce"]["n"] == 2 and ("convnet3", "channel_sparse+kd") not in rows
    table = markdown(doc)
    assert "| convnet3_w32 | channel_sparse+kd |" in table and "Not applicable: convnet3 with channel_sparse+kd" in table
    assert path.with_suffix(".png").stat().st_size > 5000
    assert not list(tmp_path.glob("*.partial.json"))


def test_a_recipe_file_names_the_standard_bench_result_by_its_stem(tmp_path):
    from benchmarks.standard import result_path
    dev = torch.device("cpu")
    path = result_path(tmp_path, str(tmp_path / "recipes" / "trained-networks.toml"), dev)
    assert path.parent == tmp_path and path.name.startswith("fmnist-standard-trained-networks-")
    assert result_path(tmp_path, "demo", dev).name.startswith("fmnist-standard-demo-")
