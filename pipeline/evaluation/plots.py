"""PNG plots of an evaluation: accuracy per generator and ROC curves, per set.

matplotlib runs on the Agg backend so that plots work on headless cluster
nodes; the backend is selected before pyplot is imported.
"""
from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def accuracy_figure(set_name: str, metrics: Mapping[str, Any]):
    """Grouped bars: real, fake and overall accuracy (strict convention, which
    is defined for every generator) plus the reference-convention accuracy."""
    order = metrics["order"]
    series = [
        ("real_acc_strict", "real (strict)"),
        ("fake_acc_strict", "fake (strict)"),
        ("acc_strict", "acc (strict)"),
        ("acc", "acc (reference)"),
    ]
    width = 0.8 / len(series)
    # 1.6 inches more for the legend at the right of the axes.
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(order) + 2) + 1.6, 4))
    for i, (key, label) in enumerate(series):
        values = [100.0 * (metrics["generators"][g][key] or 0.0) for g in order]
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(order))], values, width, label=label)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(order, rotation=30, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{set_name}: accuracy per generator")
    # Outside the axes: inside, at "best", it covered the bars of the last
    # generators whenever they were all high (no free corner left).
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def accuracy_plot(path: str, set_name: str, metrics: Mapping[str, Any]) -> None:
    """accuracy_figure as a PNG."""
    fig = accuracy_figure(set_name, metrics)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def roc_figure(set_name: str, predictions: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any]):
    """ROC curve of p(fake) per generator; None when no generator has both classes.
    Curves at AUC 1.000 all run up the left edge and along the top, one hiding the
    other, so a note in the plot names them."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    drawn, perfect = 0, []
    for g in metrics["order"]:
        rows = [p for p in predictions if p["generator"] == g and p.get("p_fake") is not None]
        labels = [int(p["label"]) for p in rows]
        if len(set(labels)) < 2:
            continue
        fpr, tpr, _ = roc_curve(labels, [float(p["p_fake"]) for p in rows])
        auc = f"{metrics['generators'][g]['auc']:.3f}"
        ax.plot(fpr, tpr, label=f"{g} (AUC {auc})")
        drawn += 1
        perfect += [g] if auc == "1.000" else []
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    if len(perfect) > 1:
        # Below the diagonal, where a better-than-chance curve never goes.
        note = textwrap.fill(f"curves at AUC 1.000 overlap: {', '.join(perfect)}", 40)
        ax.text(0.97, 0.03, note, transform=ax.transAxes, ha="right", va="bottom", fontsize="x-small",
                bbox={"facecolor": "white", "edgecolor": "grey", "alpha": 0.9})
    ax.set_xlabel("false positive rate (real called fake)")
    ax.set_ylabel("true positive rate (fake called fake)")
    ax.set_title(f"{set_name}: ROC of p(fake)")
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def roc_plot(path: str, set_name: str, predictions: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any]) -> bool:
    """roc_figure as a PNG; False (no file) when no generator has both classes."""
    fig = roc_figure(set_name, predictions, metrics)
    if fig is None:
        return False
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_plots(out_dir: str, predictions: Sequence[Mapping[str, Any]], results: Mapping[str, Any]) -> list[str]:
    """Write the plots of every set; returns the file names written."""
    written = []
    for set_name, metrics in results["sets"].items():
        rows = [p for p in predictions if p["set"] == set_name]
        acc_name = f"accuracy_{_safe(set_name)}.png"
        accuracy_plot(os.path.join(out_dir, acc_name), set_name, metrics)
        written.append(acc_name)
        roc_name = f"roc_{_safe(set_name)}.png"
        if roc_plot(os.path.join(out_dir, roc_name), set_name, rows, metrics):
            written.append(roc_name)
    return written
