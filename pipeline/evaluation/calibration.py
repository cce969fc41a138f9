"""Calibration of the CPM's p(fake): ECE, NLL, Brier, and a threshold chosen on a held-out set.

Definitions (labels y in {0 real, 1 fake}, p = p_fake, N images with a p_fake):

- ECE, 15 equal-width bins, fake-class reliability: bin b holds the images
  with p in [b/15, (b+1)/15) (the last bin also holds p = 1). With n_b images
  in bin b, conf_b the mean p of the bin and freq_b the fraction of fakes in it,
  ECE = sum_b (n_b / N) * |freq_b - conf_b|. This is the calibration of the
  binary probability itself (the curve of sklearn's calibration_curve), so all
  15 bins of [0, 1] are used; the top-label variant (confidence max(p, 1-p))
  would fold the bins onto [0.5, 1].
- NLL = -(1/N) sum [y log p + (1 - y) log(1 - p)], p clipped to [1e-7, 1 - 1e-7]
  so that a confident wrong answer costs about 16.1 nats instead of infinity.
- Brier = (1/N) sum (p - y)^2.

They are computed per generator and averaged over generators like the other
metrics (metrics.group_metrics / set_metrics), and drawn as a reliability
diagram per set (diagnostic_plots.reliability_plot).

Threshold on a held-out set (``--calibrate-on SET``): the decision
"fake iff p >= t" with the t that maximises plain accuracy over every image of
SET. Candidates are the midpoints between consecutive distinct p values of
SET, plus min(p)/2 (all fake) and (max(p)+1)/2 (all real unless max(p) = 1);
among equally accurate candidates the one nearest 0.5 wins (then the smaller),
so a flat optimum keeps the default. The other sets report their CPM accuracy
at that t (``cpm_acc_at_threshold``) next to the default 0.5 (``cpm_acc``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

ECE_BINS = 15
NLL_EPS = 1e-7


def _check(labels: Sequence[int], probs: Sequence[float]) -> None:
    if len(labels) != len(probs):
        raise ValueError(f"calibration: {len(labels)} labels but {len(probs)} probabilities")


def bin_index(p: float, bins: int = ECE_BINS) -> int:
    """Bin of p among `bins` equal-width bins of [0, 1] (p = 1 in the last one)."""
    return min(int(p * bins), bins - 1)


def reliability_bins(labels: Sequence[int], probs: Sequence[float], bins: int = ECE_BINS) -> list[dict]:
    """Per bin: lo, hi, n, mean p (conf) and fraction of fakes (freq); None where empty."""
    _check(labels, probs)
    members: list[list[tuple[int, float]]] = [[] for _ in range(bins)]
    for y, p in zip(labels, probs):
        members[bin_index(float(p), bins)].append((int(y), float(p)))
    out = []
    for b, m in enumerate(members):
        out.append({"lo": b / bins, "hi": (b + 1) / bins, "n": len(m),
                    "conf": math.fsum(p for _, p in m) / len(m) if m else None,
                    "freq": sum(y for y, _ in m) / len(m) if m else None})
    return out


def ece(labels: Sequence[int], probs: Sequence[float], bins: int = ECE_BINS) -> float | None:
    """Expected calibration error (module doc); None without images."""
    if not probs:
        return None
    n = len(probs)
    return math.fsum(b["n"] / n * abs(b["freq"] - b["conf"]) for b in reliability_bins(labels, probs, bins)
                     if b["n"])


def nll(labels: Sequence[int], probs: Sequence[float]) -> float | None:
    """Mean binary negative log-likelihood in nats, p clipped to [1e-7, 1 - 1e-7]."""
    _check(labels, probs)
    if not probs:
        return None
    total = 0.0
    for y, p in zip(labels, probs):
        p = min(max(float(p), NLL_EPS), 1.0 - NLL_EPS)
        total -= math.log(p) if y else math.log(1.0 - p)
    return total / len(probs)


def brier(labels: Sequence[int], probs: Sequence[float]) -> float | None:
    """Mean squared error of p against the label."""
    _check(labels, probs)
    if not probs:
        return None
    return math.fsum((float(p) - int(y)) ** 2 for y, p in zip(labels, probs)) / len(probs)


def accuracy_at(labels: Sequence[int], probs: Sequence[float], threshold: float) -> float | None:
    """Accuracy of the decision fake iff p >= threshold; None without images."""
    _check(labels, probs)
    if not probs:
        return None
    return sum((float(p) >= threshold) == bool(y) for y, p in zip(labels, probs)) / len(probs)


def best_threshold(labels: Sequence[int], probs: Sequence[float]) -> tuple[float, float]:
    """(threshold, accuracy there) maximising accuracy of p >= t (module doc for candidates and ties)."""
    _check(labels, probs)
    if not probs:
        raise ValueError("calibration: no image with a p_fake to choose a threshold on")
    values = sorted({float(p) for p in probs})
    candidates = [values[0] / 2, *((a + b) / 2 for a, b in zip(values, values[1:])), (values[-1] + 1) / 2]
    # One sorted sweep: accuracy at each candidate from counts of reals below and fakes at or above.
    pairs = sorted((float(p), int(y)) for y, p in zip(labels, probs))
    n, fakes = len(pairs), sum(y for _, y in pairs)
    best: tuple[float, float, float] | None = None  # (-accuracy, |t - 0.5|, t)
    i = reals_below = fakes_below = 0
    for t in candidates:
        while i < n and pairs[i][0] < t:
            reals_below += 1 - pairs[i][1]
            fakes_below += pairs[i][1]
            i += 1
        acc = (reals_below + fakes - fakes_below) / n
        key = (-acc, abs(t - 0.5), t)
        if best is None or key < best:
            best = key
    return best[2], -best[0]


def threshold_report(by_set, on: str) -> dict:
    """results.json "threshold": the threshold chosen on set `on` (module doc) and every
    set's CPM accuracy at it, per generator, averaged over generators and pooled, next to
    the same at the default 0.5. by_set: set name -> its prediction rows."""
    def scored(rows):
        rows = [r for r in rows if r.get("p_fake") is not None]
        return [int(r["label"]) for r in rows], [float(r["p_fake"]) for r in rows]

    if on not in by_set:
        raise ValueError(f"calibrate_on: set {on!r} has no scored image (sets: {', '.join(by_set)})")
    t, acc = best_threshold(*scored(by_set[on]))
    sets = {}
    for name, rows in by_set.items():
        gens: dict[str, list] = {}
        for r in rows:
            gens.setdefault(r["generator"], []).append(r)
        entry: dict = {"generators": {}}
        for key, cut in (("at_threshold", t), ("at_0.5", 0.5)):
            per_gen = {g: accuracy_at(*scored(m), cut) for g, m in gens.items()}
            defined = [v for v in per_gen.values() if v is not None]
            entry[key] = {"average": sum(defined) / len(defined) if defined else None,
                          "pooled": accuracy_at(*scored(rows), cut)}
            for g, v in per_gen.items():
                entry["generators"].setdefault(g, {})[key] = v
        sets[name] = entry
    return {"set": on, "threshold": t, "accuracy_on_set": acc, "held_out": [n for n in by_set if n != on],
            "sets": sets}
