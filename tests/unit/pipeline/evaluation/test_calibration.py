"""ECE / NLL / Brier against numbers worked out by hand, the held-out threshold, and
the calibration table and reliability diagram of a report."""
import json
import math

import pytest

from pipeline.evaluation.calibration import (
    accuracy_at, best_threshold, bin_index, brier, ece, nll, reliability_bins, threshold_report,
)

# Five images. Bins are 1/15 wide: 0.10 and 0.12 fall in bin 1 ([0.0667, 0.1333)),
# 0.90 and 0.91 in bin 13 ([0.8667, 0.9333)), 0.50 in bin 7 ([0.4667, 0.5333)).
LABELS = [0, 1, 1, 1, 0]
PROBS = [0.10, 0.12, 0.90, 0.91, 0.50]


def test_ece_by_hand():
    assert [bin_index(p) for p in PROBS] == [1, 1, 13, 13, 7]
    # bin 1: mean p 0.11, fakes 1/2 -> |0.5 - 0.11| * 2/5 = 0.156
    # bin 13: mean p 0.905, fakes 2/2 -> |1 - 0.905| * 2/5 = 0.038
    # bin 7: mean p 0.5, fakes 0/1 -> |0 - 0.5| * 1/5 = 0.1
    assert ece(LABELS, PROBS) == pytest.approx(0.156 + 0.038 + 0.1, abs=1e-12)  # 0.294
    bins = reliability_bins(LABELS, PROBS)
    assert len(bins) == 15 and [b["n"] for b in bins if b["n"]] == [2, 1, 2]
    assert bins[1]["conf"] == pytest.approx(0.11) and bins[1]["freq"] == 0.5
    # p = 1 goes in the last bin, p = 0 in the first; a perfectly calibrated pair has ECE 0.
    assert bin_index(1.0) == 14 and bin_index(0.0) == 0
    assert ece([1, 0], [1.0, 0.0]) == 0.0
    assert ece([], []) is None


def test_nll_and_brier_by_hand():
    # ln 0.9 = -0.1053605, ln 0.12 = -2.1202635, ln 0.91 = -0.0943107, ln 0.5 = -0.6931472
    # (the real image at 0.10 contributes ln(1 - 0.10) = ln 0.9, the one at 0.5 ln 0.5).
    assert nll(LABELS, PROBS) == pytest.approx((0.1053605 * 2 + 2.1202635 + 0.0943107 + 0.6931472) / 5, abs=1e-6)
    # (0.1^2 + 0.88^2 + 0.1^2 + 0.09^2 + 0.5^2) / 5 = (0.01 + 0.7744 + 0.01 + 0.0081 + 0.25) / 5
    assert brier(LABELS, PROBS) == pytest.approx(1.0525 / 5, abs=1e-12)
    # A fake at p = 0 costs -ln(1e-7) = 16.1180957 nats after clipping, not infinity.
    assert nll([1], [0.0]) == pytest.approx(16.1180957, abs=1e-6)
    assert nll([1, 0], [1.0, 0.0]) == pytest.approx(1e-7, rel=1e-3)
    with pytest.raises(ValueError, match="2 labels but 1"):
        nll([0, 1], [0.5])


def test_best_threshold_maximises_accuracy_and_prefers_near_half():
    labels = [0, 0, 1, 0, 1, 1]
    probs = [0.1, 0.2, 0.3, 0.6, 0.7, 0.8]
    # Midpoint 0.25 (only the real at 0.6 is wrong) and 0.65 (only the fake at 0.3 is
    # wrong) both give 5/6; 0.65 is nearer 0.5. At 0.5 itself 4/6 are right.
    t, acc = best_threshold(labels, probs)
    assert t == pytest.approx(0.65) and acc == pytest.approx(5 / 6)
    assert accuracy_at(labels, probs, 0.5) == pytest.approx(4 / 6)
    # Everything real is a candidate too: (max + 1) / 2.
    assert best_threshold([0, 0], [0.2, 0.4]) == (pytest.approx(0.7), 1.0)


def test_threshold_report_applies_the_held_out_threshold():
    def rows(gen, pairs):
        return [{"generator": gen, "label": y, "p_fake": p} for y, p in pairs]
    held = rows("a", [(0, 0.1), (0, 0.2), (1, 0.3), (0, 0.6), (1, 0.7), (1, 0.8)])  # t = 0.65 as above
    other = rows("b", [(0, 0.62), (1, 0.66)]) + rows("c", [(1, 0.64), (0, 0.1)])
    rep = threshold_report({"held": held, "other": other}, "held")
    assert rep["threshold"] == pytest.approx(0.65) and rep["held_out"] == ["other"]
    e = rep["sets"]["other"]
    # At 0.65: b 2/2 right, c 1/2 (the fake at 0.64 is called real); at 0.5: b 1/2, c 2/2.
    assert e["generators"]["b"] == {"at_threshold": 1.0, "at_0.5": 0.5}
    assert e["generators"]["c"] == {"at_threshold": 0.5, "at_0.5": 1.0}
    assert e["at_threshold"] == {"average": 0.75, "pooled": 0.75}
    with pytest.raises(ValueError, match="calibrate_on"):
        threshold_report({"held": held}, "missing")


def test_report_has_calibration_table_threshold_and_reliability_png(tmp_path):
    from pipeline.evaluation.report import write_report

    def row(i, set_name, gen, label, p):
        return {"key": f"{set_name}{i}", "set": set_name, "generator": gen, "label": label, "pred": label,
                "parse_status": "ok", "p_fake": p, "reasoning": "", "reference": ""}
    preds = [row(i, "a", "g", y, p) for i, (y, p) in enumerate(zip(LABELS, PROBS))]
    preds += [row(i, "b", "h", y, p) for i, (y, p) in enumerate([(0, 0.62), (1, 0.66)])]
    out = tmp_path / "r"
    ckpt = {"path": "/x", "sha256": "0" * 64, "files": {}}
    res = write_report(str(out), preds, {"a": 5, "b": 2}, [], ckpt, {"calibrate_on": "a"})
    g = res["sets"]["a"]["generators"]["g"]
    assert g["ece"] == pytest.approx(0.294) and g["brier"] == pytest.approx(0.2105)
    assert res["sets"]["a"]["average"]["ece"] == pytest.approx(0.294)  # one generator: its own value
    assert res["threshold"]["set"] == "a"
    md = (out / "results.md").read_text()
    assert "**Calibration of p(fake)**" in md and "| g | 5 | 60.00 | 0.2940 |" in md
    assert "## Threshold chosen on a held-out set" in md and "| a (in-sample) |" in md
    assert (out / "reliability_a.png").read_bytes()[:4] == b"\x89PNG"
    assert "reliability_b.png" in json.loads((out / "results.json").read_text())["plots"]
    assert math.isclose(res["sets"]["b"]["pooled"]["nll"], -(math.log(0.38) + math.log(0.66)) / 2)


def test_calibrate_on_must_name_a_set(tmp_path):
    from pipeline.evaluation.config import EvalConfig, EvalConfigError

    cfg = EvalConfig(checkpoint=str(tmp_path), out="o", shards=str(tmp_path), calibrate_on="celeb-df")
    with pytest.raises(EvalConfigError, match=r"^calibrate_on: 'celeb-df' is not one of the sets \(mmfr\)"):
        cfg.validate()
