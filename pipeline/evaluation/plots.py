"""PNG plots of an evaluation: accuracy per generator and ROC curves, per set.

matplotlib runs on the Agg backend so that plots work on headless cluster
nodes; the backend is selected before pyplot is imported.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def accuracy_plot(path: str, set_name: str, metrics: Mapping[str, Any]) -> None:
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
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(order) + 2), 4))
    for i, (key, label) in enumerate(series):
        values = [100.0 * (metrics["generators"][g][key] or 0.0) for g in order]
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(order))], values, width, label=label)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(order, rotation=30, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{set_name}: accuracy per generator")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def roc_plot(path: str, set_name: str, predictions: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any]) -> bool:
    """ROC curve of p(fake) per generator; False (no file) when no generator has both classes."""
    fig, ax = plt.subplots(figsize=(5, 5))
    drawn = 0
    for g in metrics["order"]:
        rows = [p for p in predictions if p["generator"] == g and p.get("p_fake") is not None]
        labels = [int(p["label"]) for p in rows]
        if len(set(labels)) < 2:
            continue
        fpr, tpr, _ = roc_curve(labels, [float(p["p_fake"]) for p in rows])
        ax.plot(fpr, tpr, label=f"{g} (AUC {metrics['generators'][g]['auc']:.3f})")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return False
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set_xlabel("false positive rate (real called fake)")
    ax.set_ylabel("true positive rate (fake called fake)")
    ax.set_title(f"{set_name}: ROC of p(fake)")
    ax.legend(fontsize="x-small", loc="lower right")
    fig.tight_layout()
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
