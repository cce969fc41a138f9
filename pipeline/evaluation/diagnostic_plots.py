"""PNG plots of calibration and robustness (next to plots.py's accuracy and ROC plots).

- ``reliability_<set>.png``: the 15-bin reliability diagram of p(fake) over the
  set's images (calibration.reliability_bins): fraction of fakes against mean
  p(fake) per bin, the diagonal of perfect calibration, the bin counts below;
- ``robustness_<set>.png``: per perturbation kind, accuracy (reference and
  strict), CPM accuracy and AUC against strength, the clean run drawn at the
  kind's "no perturbation" strength (JPEG quality 100, scale 1, radius 0).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.evaluation.calibration import ECE_BINS, reliability_bins
from pipeline.evaluation.perturbations import STRENGTH_NAMES
from pipeline.evaluation.plots import _safe, plt

# Where the clean run sits on each kind's strength axis.
CLEAN_STRENGTH = {"jpeg": 100.0, "resize": 1.0, "blur": 0.0}
SWEEP_SERIES = (("acc", "acc (reference)"), ("acc_strict", "acc (strict)"), ("cpm_acc", "CPM acc"),
                ("auc", "AUC"))


def reliability_plot(path: str, set_name: str, predictions: Sequence[Mapping[str, Any]], ece: float | None) -> bool:
    """Reliability diagram of the set's p(fake); False (no file) when no image has one."""
    rows = [p for p in predictions if p.get("p_fake") is not None]
    if not rows:
        return False
    bins = reliability_bins([int(p["label"]) for p in rows], [float(p["p_fake"]) for p in rows])
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = 1.0 / ECE_BINS
    full = [b for b in bins if b["n"]]
    ax.bar([b["lo"] for b in full], [b["freq"] for b in full], width, align="edge", edgecolor="black",
           label="fraction of fakes")
    ax.plot([b["conf"] for b in full], [b["freq"] for b in full], "o", color="black", markersize=3,
            label="(mean p, fraction) per bin")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="perfect calibration")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of fakes")
    ece_text = "n/a" if ece is None else f"{ece:.4f}"
    ax.set_title(f"{set_name}: reliability of p(fake)\nECE {ece_text} over all images ({ECE_BINS} bins)")
    ax.legend(fontsize="x-small", loc="lower right")
    axn.bar([b["lo"] for b in bins], [b["n"] for b in bins], width, align="edge", color="grey")
    axn.set_xlim(0, 1)
    axn.set_xlabel("p(fake)")
    axn.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def robustness_plot(path: str, set_name: str, kinds: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """One panel per perturbation kind: the SWEEP_SERIES metrics against strength."""
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), squeeze=False)
    for ax, (kind, rows) in zip(axes[0], kinds.items()):
        xs = [CLEAN_STRENGTH[kind] if r["strength"] is None else r["strength"] for r in rows]
        order = sorted(range(len(rows)), key=lambda i: xs[i])
        for key, label in SWEEP_SERIES:
            pts = [(xs[i], rows[i][key]) for i in order if rows[i][key] is not None]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
        if kind in ("jpeg", "resize"):
            ax.invert_xaxis()  # lower quality / scale = stronger: to the right, as blur's radius
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(STRENGTH_NAMES[kind])
        ax.set_title(f"{set_name}: {kind}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy / AUC")
    axes[0][-1].legend(fontsize="x-small", loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_diagnostic_plots(out_dir: str, predictions: Sequence[Mapping[str, Any]],
                           results: Mapping[str, Any]) -> list[str]:
    """Reliability diagram of every set and robustness plot of every swept set; the file names."""
    written = []
    for set_name, metrics in results["sets"].items():
        name = f"reliability_{_safe(set_name)}.png"
        rows = [p for p in predictions if p["set"] == set_name]
        if reliability_plot(os.path.join(out_dir, name), set_name, rows, metrics["pooled"].get("ece")):
            written.append(name)
    for set_name, kinds in (results.get("robustness") or {}).items():
        name = f"robustness_{_safe(set_name)}.png"
        robustness_plot(os.path.join(out_dir, name), set_name, kinds)
        written.append(name)
    return written
