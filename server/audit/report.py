"""audit.json + a self-contained audit.html (inline CSS, figures as PNG files beside it)."""
from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from server.audit.attacks import MODEL_ATTACKS  # noqa: E402

FIGURES = ("roc.png", "roc_shipped.png", "inversion.png", "memorisation.png", "closest_pairs.png", "privacy_utility.png")


def is_central(privacy: dict | None) -> bool:
    """Whether a run's privacy entry is the trusted-server (central DP) threat model (server/pipeline.py)."""
    return str((privacy or {}).get("threat_model", "")).startswith("trusted server")


def plot_roc(curves: dict, path: Path, title: str = "Membership inference") -> None:
    """`curves`: label -> attack result (its fpr, tpr, auc)."""
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for label, r in curves.items():
        ax.plot([max(f, 1e-4) for f in r["fpr"]], [max(t, 1e-4) for t in r["tpr"]], label=f"{label} (AUC {r['auc']:.3f})")
    ax.plot([1e-4, 1], [1e-4, 1], "k:", label="chance")
    ax.set(xscale="log", yscale="log", xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memorisation(mem: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(mem["hist"]["real"], bins=40, alpha=0.6, density=True, label="real -> nearest other real")
    ax.hist(mem["hist"]["synthetic"], bins=40, alpha=0.6, density=True, label="synthetic -> nearest real")
    ax.set(xlabel="RMS pixel distance (images in [-1, 1])", ylabel="density", title="Distance to nearest training image")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_utility(points: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    xs = [p["epsilon"] if p["epsilon"] != "inf" else "inf (no DP)" for p in points]
    labels = [str(x if isinstance(x, str) else f"{x:g}") for x in xs]
    ax.plot(labels, [p["accuracy"] for p in points], "o-", label="student on synthetic set")
    if all(p.get("random_real") is not None for p in points):
        ax.plot(labels, [p["random_real"] for p in points], "s--", label="random real (no DP, reference)")
    ax.set(xlabel="epsilon per image", ylabel="test accuracy", title="Privacy-utility", ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row(*cells) -> str:
    return "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"


def set_section(mia: dict) -> str:
    """The page's section on the released set's own membership attacks."""
    if "members_are" in mia:           # central DP: public latents conditioned the set
        return f"""<h3>The released synthetic set</h3>
<p class="note">Members: {mia['members']} pooled private images, each inside the one release the set was fitted to;
non-members: {mia['nonmembers']} test images. No private latent conditioned the set (public latents did). The target
student trains on the set alone. {_central_lira(mia)}</p>"""
    return f"""<h3>Conditioning: the synthetic set</h3>
<p class="note">Members: {mia['members']} real private images whose latents conditioned the synthetic set; non-members:
{mia['nonmembers']} private images that conditioned nothing. The target student trains on the set's soft labels alone.
LiRA (offline) uses {mia.get('shadows', 0)} OUT shadow students; the shadows reuse the run's chain, so this measures
leakage through conditioning and the student.</p>"""


def _central_lira(part: dict) -> str:
    """The sentence on a central-DP audit's LiRA shadows (or why none ran)."""
    if "shadows" not in part:
        return "LiRA was not run (--shadows 0)."
    mode = "online" if "lira_online" in part or "lira_online" in part.get("student", {}) else "offline"
    kind = "shadows" if mode == "online" else "OUT shadows"
    return f"LiRA ({mode}) uses {part['shadows']} {kind}: {html.escape(part['shadows_are'])}."


def _shipped_lira(shipped: dict, central: bool, noised: bool) -> str:
    """The sentence on the shadows of the shipped teacher and student (or why none ran)."""
    if central:
        return f"{_central_lira(shipped)} {shipped['teacher']['lira_skipped']}."
    if "shadows" not in shipped:
        return shipped.get("lira_skipped", "LiRA was not run (--shadows 0).")
    fresh = (" (each on a fresh draw of the devices' release, filtered as the server filtered the run's)"
             if noised else "")
    return (f"LiRA (offline): {shipped['shadows']} OUT shadow teachers retrained without the candidate "
            f"members{fresh}, a student distilled from each.")


def write_report(result: dict, out: Path) -> None:
    out = Path(out)
    mia, inv, mem, shipped = result["membership"], result["inversion"], result["memorisation"], result["shipped"]
    plot_roc({**{k: mia[k] for k in MODEL_ATTACKS if k in mia},
              **{f"released set {k}": v for k, v in mia.get("released_set", {}).items()}}, out / "roc.png")
    plot_roc({f"{who} {k}": shipped[who][k] for who in ("teacher", "student") if who in shipped
              for k in MODEL_ATTACKS if k in shipped[who]}, out / "roc_shipped.png",
             "Membership of the training data")
    plot_memorisation(mem, out / "memorisation.png")
    plot_utility(result["privacy_utility"], out / "privacy_utility.png")
    (out / "audit.json").write_text(json.dumps(result, indent=2))
    priv = result.get("privacy") or {"mechanism": "none", "epsilon": "inf"}
    central = is_central(priv)
    where = f"Central DP on the trusted server ({priv.get('mechanism')})" if central else "Client-side Gaussian mechanism"
    dp = ("No differential privacy was applied: epsilon = inf. Latents were only sealed in transit."
          if priv.get("mechanism") == "none" else
          f"{where}: epsilon = {priv['epsilon']:.4g}, delta = {priv['delta']:.2g} per record "
          f"({priv['neighbouring']}).")
    attack_rows = "".join(_row(r["target"], r["attack"], f"{r['auc']:.4f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}]",
                               f"{r['tpr_at_1pct_fpr']:.4f}", f"{r['tpr_at_0.1pct_fpr']:.4f}",
                               f"{r['epsilon_lower_bound']:.2f}") for r in result["verdict"]["attacks"])
    trained_on = ("the teacher trained on the public split alone" if central else
                  "the teacher trained on every pooled latent")
    shipped_note = (shipped["skipped"] if "skipped" in shipped else
                    f"Members: {shipped['members']} pooled private images ({trained_on}); "
                    f"non-members: {shipped['nonmembers']} test images. The shipped student trains with "
                    f"'{shipped['student_loss']}' from the run's teacher. "
                    + _shipped_lira(shipped, central, priv.get("mechanism") != "none"))
    inv_rows = "".join(_row(k, f"{v['psnr_db']:.2f}", f"{v['ssim']:.4f}") for k, v in inv["settings"].items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fedcondense privacy audit</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px}}img{{max-width:100%;border:1px solid #ddd}}.note{{color:#555}}</style></head><body>
<h1>Privacy audit</h1><p>Run: <code>{html.escape(result['run'])}</code> ({html.escape(result['mode'])}).</p>
<h2>Verdict: {html.escape(result['verdict']['status'])}</h2><p>{html.escape(result['verdict']['text'])}</p>
<h2>Differential privacy spent</h2><p>{html.escape(dp)}</p>
<h2>Membership inference</h2>
<table><tr><th>target</th><th>attack</th><th>AUC [95% bootstrap CI]</th><th>TPR @ 1% FPR</th><th>TPR @ 0.1% FPR</th>
<th>epsilon lower bound (95%)</th></tr>{attack_rows}</table>
<p class="note">Epsilon lower bounds: the attack read as a hypothesis test, its threshold chosen on one half of the
candidates and its error rates bounded by Clopper-Pearson on the other (Jagielski et al. 2020; Nasr et al. 2021), each
candidate one trial of the game; intervals: 200 bootstrap resamples of members and non-members.</p>
{set_section(mia)}
<p><img src="roc.png" alt="ROC curves"></p>
<h3>Training: the shipped teacher and student</h3><p class="note">{html.escape(shipped_note)}</p>
<p><img src="roc_shipped.png" alt="ROC curves of the shipped models"></p>
<h2>Latent inversion</h2><p class="note">An attacker who knows E1 trains an inverse network on the public split ({inv['inverter_steps']} steps)
and reconstructs {inv['images']} client images from their latents. Rows: {html.escape(', '.join(inv['rows']))}.</p>
<table><tr><th>setting</th><th>PSNR (dB)</th><th>SSIM</th></tr>{inv_rows}</table><p><img src="inversion.png" alt="inversion grid"></p>
<h2>Memorisation</h2><p>Median distance synthetic -> nearest real: {mem['synthetic_to_real']['median']:.4f};
real -> nearest other real: {mem['real_to_real']['median']:.4f}; fraction of synthetic images closer than the real median:
{mem['fraction_synthetic_closer_than_real_median']:.3f}.</p><p><img src="memorisation.png" alt="distance histogram"></p>
<p class="note">Closest pairs (top row synthetic, bottom row its nearest real image):</p><p><img src="closest_pairs.png" alt="closest pairs"></p>
<h2>Privacy-utility</h2><table><tr><th>epsilon</th><th>student accuracy</th><th>run</th></tr>
{''.join(_row(p['epsilon'], f"{p['accuracy']:.4f}", p['run']) for p in result['privacy_utility'])}</table>
<p><img src="privacy_utility.png" alt="privacy-utility curve"></p>
<p class="note">Audit took {result['seconds']:.0f} s. Numbers in audit.json.</p>
<script>window.addEventListener("load", () => {{ document.body.dataset.brokenImages =
  [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).length; }});</script></body></html>"""
    (out / "audit.html").write_text(page)
