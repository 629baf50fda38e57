"""The human page of a standard-protocol bench run: a markdown table (ours, the baselines and the published
figures side by side), a plot, and the grids of the seed-0 sets."""
from __future__ import annotations

from pathlib import Path

ORDER = ("ours_patent", "ours", "ours_refined", "ours_refined_mean", "ours_refined_mmd",
         "ours_refined_random", "ours_refined_trained", "ours_refined_idm", "ours_formed",
         "ours_formed_refined", "ours_mixed_refined", "random_real",
         "random_real_formed", "herding", "k_center", "dm", "max_coverage", "max_coverage_patent",
         "max_coverage_random_real", "full_real")


def _cell(rows: dict, arm: str, ipc, epochs: int, labels: str = "hard") -> str:
    r = rows.get((arm, ipc, epochs, labels))
    return "-" if r is None else f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"


def markdown(doc: dict) -> str:
    rows = {(r["arm"], r["ipc"], r["epochs"], r["labels"]): r for r in doc.get("summary", [])}
    ipcs = sorted({r["ipc"] for r in doc.get("summary", []) if r["ipc"]})
    epochs = sorted({r["epochs"] for r in doc.get("summary", []) if r["ipc"]})
    cfg = doc["config"]
    lines = [f"Standard protocol (ConvNet-3 from scratch on the set alone, hard labels, DSA augmentation, full test set), "
             f"recipe `{doc['recipe']}`, {doc['device']}, {doc['created']}. Mean ± std over {cfg['evaluators']} evaluators "
             f"x condensation seeds {cfg['seeds']}." + (f" DM: {cfg['dm_iterations']} iterations at IPC {cfg['dm_ipcs']}."
                                                          if "dm" in cfg["arms"] else ""), ""]
    head = "| arm | " + " | ".join(f"IPC {i}, {e} ep" for i in ipcs for e in epochs) + " |"
    lines += [head, "|---" * (1 + len(ipcs) * len(epochs)) + "|"]
    for arm in ORDER:
        if any(k[0] == arm for k in rows) and arm != "full_real" and not arm.startswith("max_coverage"):
            lines.append(f"| {arm} | " + " | ".join(_cell(rows, arm, i, e) for i in ipcs for e in epochs) + " |")
        if any(k[0] == arm and k[3] == "soft" for k in rows):
            lines.append(f"| {arm}, its own labels n_c/T | " + " | ".join(_cell(rows, arm, i, e, "soft") for i in ipcs
                                                                          for e in epochs) + " |")
    for name, figs in doc["published"].items():
        lines.append(f"| *{name}* | " + " | ".join(
            (f"{figs[(1, 10, 50).index(i)]}" if i in (1, 10, 50) and e == epochs[0] else "") for i in ipcs for e in epochs) + " |")
    full = [r for r in doc.get("summary", []) if r["arm"] == "full_real"]
    if full:
        lines += ["", f"Full real data ({cfg['full_epochs']} epochs): {100 * full[0]['mean']:.2f} ± {100 * full[0]['std']:.2f} %."]
    for r in (r for r in doc.get("summary", []) if r["arm"].startswith("max_coverage")):
        mc = doc["max_coverage"]
        lines.append(f"Max coverage, {r['arm']}: {mc['synthetic_images']} images (every one of {mc['real_latents']} "
                     f"latents once): {100 * r['mean']:.2f} ± {100 * r['std']:.2f} %.")
    secs = doc.get("condense_seconds", {})
    for key in sorted(secs):
        lines.append(f"- condensation {key}: {sum(secs[key]) / len(secs[key]):.1f} s per set")
    if doc.get("skipped"):
        lines += ["", "Not run: " + "; ".join(doc["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def plot(doc: dict, stem: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in doc.get("summary", []) if r["ipc"] and r["labels"] == "hard"]
    if not rows:
        return
    first = min(r["epochs"] for r in rows)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm in ORDER:
        pts = sorted((r["ipc"], r["mean"], r["std"]) for r in rows if r["arm"] == arm and r["epochs"] == first)
        if pts:
            ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts], [100 * p[2] for p in pts], marker="o",
                        label=arm, capsize=3)
    for name, figs in doc["published"].items():
        if name.startswith(("DSA", "IDC")):
            ax.plot([1, 10, 50], figs, ls="--", alpha=0.6, label=name)
    ax.set(xscale="log", xlabel="images per class", ylabel="test accuracy (%)",
           title=f"Standard protocol, {first} epochs, {doc['device']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=110)
    plt.close(fig)


def write_report(doc: dict, stem: Path) -> None:
    Path(f"{stem}.md").write_text(markdown(doc))
    plot(doc, stem)
