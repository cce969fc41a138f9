"""The report's plots show everything they draw: no legend over the bars, a note
when ROC curves at AUC 1.000 hide each other."""
from __future__ import annotations

import pytest

from pipeline.evaluation.metrics import set_metrics
from pipeline.evaluation.plots import accuracy_figure, roc_figure

GENERATORS = ["flux", "stablediffusion", "gigagan", "dalle3", "midjourney"]


def _rows(separable: set[str]) -> list[dict]:
    """4 real + 4 fake per generator, all answered correctly; p(fake) separates the
    classes for the `separable` generators (AUC 1) and half-overlaps otherwise."""
    rows = []
    for g in GENERATORS:
        for i in range(8):
            label = i % 2
            p = (0.1 + 0.8 * label) if g in separable else (0.2 + 0.1 * i + 0.05 * label)
            rows.append({"key": f"{g}-{i}", "set": "mmfr", "generator": g, "label": label, "pred": label,
                         "parse_status": "ok", "p_fake": p, "reasoning": "", "reference": "",
                         "bleu1": None, "rouge_l": None, "css": None})
    return rows


@pytest.fixture
def figures():
    import matplotlib.pyplot as plt

    made = []
    yield made
    for fig in made:
        plt.close(fig)


def test_accuracy_legend_covers_no_bar(figures):
    # Every bar at 100%: the axes have no free corner, so a legend inside them
    # (the old loc="best") lay over the last generators' bars.
    metrics = set_metrics(_rows(set(GENERATORS)))
    assert all(metrics["generators"][g]["acc_strict"] == 1.0 for g in GENERATORS)
    fig = accuracy_figure("mmfr", metrics)
    figures.append(fig)
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    bars = [patch.get_window_extent(renderer) for patch in ax.patches]
    assert len(bars) == 4 * len(GENERATORS)
    assert not any(legend.overlaps(bar) for bar in bars)
    # ... and the legend is inside the saved figure, not cut off at its edge.
    assert fig.bbox.contains(legend.x0, legend.y0) and fig.bbox.contains(legend.x1, legend.y1)


def _texts(fig) -> list[str]:
    return [t.get_text().replace("\n", " ") for t in fig.axes[0].texts]


def test_roc_notes_the_curves_that_overlap_at_auc_1(figures):
    perfect = {"flux", "gigagan", "midjourney"}
    metrics = set_metrics(_rows(perfect))
    fig = roc_figure("mmfr", _rows(perfect), metrics)
    figures.append(fig)
    names = [g for g in metrics["order"] if g in perfect]  # the legend's order (the paper's)
    assert _texts(fig) == [f"curves at AUC 1.000 overlap: {', '.join(names)}"]
    # One curve at AUC 1.000 hides nothing: no note.
    fig = roc_figure("mmfr", _rows({"flux"}), set_metrics(_rows({"flux"})))
    figures.append(fig)
    assert _texts(fig) == []
