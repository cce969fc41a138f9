"""Evaluation outputs: results.json, results.md, predictions.jsonl and plots.

Everything in the report is computed from the prediction rows, so a report can
be rebuilt from ``predictions.jsonl`` alone (``python -m
pipeline.evaluation.report RESULTS_DIR``) and the tests can check that the
tables agree with the per-image lines.

A prediction row is a dict with at least ``PREDICTION_FIELDS``; the runner
adds the per-image text scores (``bleu1``, ``rouge_l``, ``css``) and the raw
generated ``answer``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pipeline.evaluation.calibration import threshold_report
from pipeline.evaluation.metrics import generator_order, set_metrics
from pipeline.evaluation.parsing import ALL_STATUSES, PARSEABLE_STATUSES
from sharding.shard_set import file_digest
from pipeline.evaluation.perturbations import parse_perturbations
from pipeline.evaluation.robustness import robustness_markdown, robustness_results
from pipeline.evaluation.table_format import format_value
from pipeline.evaluation.video import VIDEO_COLUMNS, video_set_metrics
from common.atomic_files import atomic_writer, write_atomic

log = logging.getLogger(__name__)

PREDICTION_FIELDS: tuple[str, ...] = (
    "key", "set", "generator", "label", "pred", "parse_status", "p_fake", "reasoning", "reference",
)
# Per-image text scores, the raw answer, and where the image came from.
# `video`: the frame's video relpath (None for a still image; video.py), `face_found`
# with --face-crop, `perturbation` in predictions_perturbed.jsonl.
EXTRA_FIELDS: tuple[str, ...] = ("bleu1", "rouge_l", "css", "answer", "relpath", "shard", "index", "video",
                                 "face_found", "perturbation")
PERTURBED_FILE = "predictions_perturbed.jsonl"
RESULTS_VERSION = 1

# Columns of the tables: (metric key, header, kind). "pct" values are shown
# x100 with 2 decimals like the paper's accuracies; "frac" with 4 decimals.
REFERENCE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("n", "N", "int"),
    ("real_acc", "Real Acc", "pct"),
    ("fake_acc", "Fake Acc", "pct"),
    ("acc", "Acc", "pct"),
    ("bleu1", "BLEU-1", "frac"),
    ("rouge_l", "ROUGE-L", "frac"),
    ("css", "CSS", "frac"),
    ("cpm_acc", "CPM Acc", "pct"),
    ("auc", "AUC", "frac"),
    ("ap", "AP", "frac"),
    ("parse_failure_rate", "Unparsed %", "pct"),
)
STRICT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("n", "N", "int"),
    ("real_acc_strict", "Real Acc", "pct"),
    ("fake_acc_strict", "Fake Acc", "pct"),
    ("acc_strict", "Acc", "pct"),
    ("bleu1_strict", "BLEU-1", "frac"),
    ("rouge_l_strict", "ROUGE-L", "frac"),
    ("css_strict", "CSS", "frac"),
)
CALIBRATION_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("n_p_fake", "N", "int"),
    ("cpm_acc", "CPM Acc", "pct"),
    ("ece", "ECE", "frac"),
    ("nll", "NLL", "frac"),
    ("brier", "Brier", "frac"),
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# Top-level results.json entries that are not computed from the predictions
# (kept by `rebuild`): timings, the protocol that ran, what the selection did.
RUN_ENTRIES = ("run", "protocol", "selection")
PROTOCOL_TITLES = {
    "ours": "ours (Vicuna v1 prompt as in training, greedy decoding, loose parser with negation check)",
    "reference": "reference (forgery_eval/eval.py: llava_v1 prompt, sampling, substring parser, "
                 "images listed in the reasoning JSONs)",
}


def checkpoint_identity(path: str) -> dict[str, Any]:
    """Absolute path and sha256 of every weight file of a checkpoint.

    ``sha256`` is one digest over the sorted (relative name, file digest)
    pairs, so two checkpoints with the same weights compare equal wherever
    they are stored. Raises when the directory holds no weight file: a report
    that cannot say which weights it scored is not worth writing.
    """
    path = os.path.abspath(path)
    files = {}
    if os.path.isfile(path):
        files[os.path.basename(path)] = file_digest(path)
    else:
        for root, _dirs, names in os.walk(path):
            for name in names:
                if name.endswith(WEIGHT_SUFFIXES):
                    full = os.path.join(root, name)
                    files[os.path.relpath(full, path)] = file_digest(full)
    if not files:
        raise FileNotFoundError(f"checkpoint {path!r}: no weight file ({', '.join(WEIGHT_SUFFIXES)}) found")
    combined = hashlib.sha256()
    for name in sorted(files):
        combined.update(f"{name}\0{files[name]}\n".encode())
    return {"path": path, "sha256": combined.hexdigest(), "files": dict(sorted(files.items()))}


def sort_predictions(predictions: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Deterministic order: set, generator (paper order), key."""
    preds = [dict(p) for p in predictions]
    ranks = {g: i for i, g in enumerate(generator_order({p["generator"] for p in preds}))}
    return sorted(preds, key=lambda p: (p["set"], ranks[p["generator"]], p["key"]))


def write_predictions(path: str, predictions: Sequence[Mapping[str, Any]]) -> None:
    with atomic_writer(path) as f:
        for p in predictions:
            missing = [k for k in PREDICTION_FIELDS if k not in p]
            if missing:
                raise ValueError(f"prediction {p.get('key')!r} lacks fields {missing}")
            row = {k: p[k] for k in PREDICTION_FIELDS}
            row.update({k: p[k] for k in EXTRA_FIELDS if k in p})
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_predictions(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _table(title: str, metrics: Mapping[str, Any], columns) -> list[str]:
    lines = [f"**{title}**", "", "| Generator | " + " | ".join(h for _, h, _ in columns) + " |"]
    lines.append("|---|" + "---:|" * len(columns))
    rows = [(g, metrics["generators"][g]) for g in metrics["order"]]
    # Average: the paper's row (mean over generators). All images: the set as
    # one pool, the only defined AUC when each generator holds one class.
    rows += [("**Average**", metrics["average"]), ("**All images**", metrics["pooled"])]
    for name, m in rows:
        lines.append(f"| {name} | " + " | ".join(format_value(m[k], kind) for k, _, kind in columns) + " |")
    return lines + [""]


def warn_when_nothing_parsed(results: Mapping[str, Any]) -> list[str]:
    """Log a warning for each set with answers of which none carries a decision
    (the accuracy columns of its report are then empty, not zero); returns those sets."""
    empty = []
    for name, counts in results.get("parse_status", {}).items():
        total = sum(counts.values())
        if total and not any(counts.get(s, 0) for s in PARSEABLE_STATUSES):
            empty.append(name)
            log.warning("set %s: none of its %d answers could be parsed (%s), so its accuracies are empty; check "
                        "the protocol, the prompt and max_new_tokens", name, total,
                        ", ".join(f"{k} {v}" for k, v in counts.items()))
    return empty


def status_counts(predictions: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """parse_status -> number of answers, in ALL_STATUSES order (zeros left out)."""
    counts: dict[str, int] = {}
    for p in predictions:
        counts[p["parse_status"]] = counts.get(p["parse_status"], 0) + 1
    order = [k for k in ALL_STATUSES if k in counts] + sorted(set(counts) - set(ALL_STATUSES))
    return {k: counts[k] for k in order}


def _protocol_lines(protocol: Mapping[str, Any] | None) -> list[str]:
    if not protocol:
        return []
    g = protocol["generation"]
    top_p = "none" if g["top_p"] is None else g["top_p"]
    lines = [f"Protocol: **{PROTOCOL_TITLES.get(protocol['name'], protocol['name'])}**; conversation "
             f"`{g['conversation']}`, temperature {g['temperature']}, top_p {top_p}, {g['num_beams']} beam, "
             f"{g['max_new_tokens']} new tokens, seed {protocol['seed']}; max per class "
             f"{protocol['max_per_class'] or 'all'}, limit {protocol['limit'] or 'none'}."]
    if protocol.get("deviations"):
        dev = ", ".join(f"{k}={v}" for k, v in protocol["deviations"].items())
        lines.append(f"Settings that differ from the protocol's: {dev}.")
    return lines + [""]


def _status_line(counts: Mapping[str, int]) -> list[str]:
    bad = {k: v for k, v in counts.items() if k not in PARSEABLE_STATUSES}
    if not bad:
        return ["Unparseable answers: none.", ""]
    return ["Unparseable answers (left out of the reference convention): "
            + ", ".join(f"{k} {v}" for k, v in bad.items()) + ".", ""]


def render_markdown(results: Mapping[str, Any]) -> str:
    """results.md: per set, one table per convention, generators as rows."""
    c = results["counts"]
    lines = [
        "# Evaluation results",
        "",
        f"Checkpoint: `{results['checkpoint']['path']}` (sha256 `{results['checkpoint']['sha256'][:16]}`)",
        "",
        *_protocol_lines(results.get("protocol")),
        f"Images: {c['expected']} expected, {c['scored']} scored, {c['failed']} failed.",
        "",
        "Accuracies and the unparsed share in %, other metrics in [0, 1]. Average = mean over the",
        "generators of the set; All images = the set as one pool. *Reference convention*: unparseable",
        "answers are left out (as in the reference implementation). *Strict*: they count as wrong.",
        "AUC/AP use the CPM's p(fake) of every image, and so do ECE (15 equal-width bins of p(fake)),",
        "NLL and Brier (pipeline/evaluation/calibration.py).",
        "",
    ]
    for name, metrics in results["sets"].items():
        sc = c["per_set"][name]
        lines += [f"## {name}", "", f"{sc['expected']} expected, {sc['scored']} scored, {sc['failed']} failed.", ""]
        sel = (results.get("selection") or {}).get(name)
        if sel and sel["selected"] != sel["available"]:
            lines += [f"Selected {sel['selected']} of {sel['available']} images (not in the reasoning JSON: "
                      f"{sel['not_in_reasoning_json']}, over max per class: {sel['over_max_per_class']}, "
                      f"over limit: {sel['over_limit']}).", ""]
        lines += _status_line(results.get("parse_status", {}).get(name, {}))
        lines += _table("Reference convention", metrics, REFERENCE_COLUMNS)
        lines += _table("Strict convention", metrics, STRICT_COLUMNS)
        lines += _table("Calibration of p(fake)", metrics, CALIBRATION_COLUMNS)
        if metrics.get("video"):
            lines += ["Video level: a video's p(fake) is the mean over its frames, fake iff >= 0.5 "
                      "(pipeline/evaluation/video.py); frame columns are the same frames scored one by one.", ""]
            lines += _table("Video level", metrics["video"], VIDEO_COLUMNS)
    lines += _threshold_lines(results.get("threshold"))
    lines += _face_crop_lines(results.get("face_crop"))
    lines += robustness_markdown(results.get("robustness") or {})
    return "\n".join(lines)


def _threshold_lines(threshold: Mapping[str, Any] | None) -> list[str]:
    if not threshold:
        return []
    lines = ["## Threshold chosen on a held-out set", "",
             f"Threshold on p(fake) maximising accuracy on **{threshold['set']}**: {threshold['threshold']:.4f} "
             f"(accuracy there {format_value(threshold['accuracy_on_set'], 'pct')}); CPM accuracy (%) of every "
             f"set at it and at 0.5 (the row of {threshold['set']} itself is in-sample).", "",
             "| Set | Avg @ 0.5 | Avg @ threshold | All images @ 0.5 | All images @ threshold |",
             "|---|---:|---:|---:|---:|"]
    for name, e in threshold["sets"].items():
        cells = [e["at_0.5"]["average"], e["at_threshold"]["average"], e["at_0.5"]["pooled"],
                 e["at_threshold"]["pooled"]]
        label = f"{name} (in-sample)" if name == threshold["set"] else name
        lines.append(f"| {label} | " + " | ".join(format_value(v, "pct") for v in cells) + " |")
    return lines + [""]


def _face_crop_lines(face_crop: Mapping[str, int] | None) -> list[str]:
    if not face_crop:
        return []
    return [f"Face crop: a face was found in {face_crop['found']} of {face_crop['frames']} video frames; the "
            "others were scored whole.", ""]


def face_crop_counts(predictions: Iterable[Mapping[str, Any]]) -> dict[str, int] | None:
    """Frames cropped to a face and frames scored whole (--face-crop); None without the crop."""
    flags = [p["face_found"] for p in predictions if p.get("face_found") is not None]
    return {"frames": len(flags), "found": sum(bool(f) for f in flags)} if flags else None


def set_results(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A set's metrics (metrics.set_metrics) plus its video level when it holds video frames."""
    metrics = set_metrics(rows)
    video = video_set_metrics(rows, metrics["order"])
    if video:
        metrics["video"] = video
    return metrics


def build_results(
    predictions: Sequence[Mapping[str, Any]],
    expected: Mapping[str, int],
    failures: Sequence[Mapping[str, Any]],
    checkpoint: Mapping[str, Any],
    config: Mapping[str, Any],
) -> dict[str, Any]:
    """The results.json object; checks that expected = scored + failed per set."""
    by_set: dict[str, list[Mapping[str, Any]]] = {}
    for p in predictions:
        by_set.setdefault(p["set"], []).append(p)
    failed_by_set: dict[str, int] = {}
    for f in failures:
        failed_by_set[f["set"]] = failed_by_set.get(f["set"], 0) + 1
    per_set = {}
    # Sets in the caller's order (MMFR first, then benchmarks as given), then any other.
    names = list(expected) + sorted((set(by_set) | set(failed_by_set)) - set(expected))
    for name in names:
        counts = {"expected": int(expected.get(name, 0)), "scored": len(by_set.get(name, [])),
                  "failed": failed_by_set.get(name, 0)}
        if counts["expected"] != counts["scored"] + counts["failed"]:
            raise RuntimeError(
                f"set {name!r}: {counts['expected']} images expected but {counts['scored']} scored "
                f"+ {counts['failed']} failed; some images were lost or scored twice"
            )
        keys = [p["key"] for p in by_set.get(name, [])]
        if len(keys) != len(set(keys)):
            raise RuntimeError(f"set {name!r}: some images were scored more than once")
        per_set[name] = counts
    totals = {k: sum(s[k] for s in per_set.values()) for k in ("expected", "scored", "failed")}
    return {
        "version": RESULTS_VERSION,
        "checkpoint": dict(checkpoint),
        "config": dict(config),
        "counts": {**totals, "per_set": per_set},
        "sets": {name: set_results(by_set[name]) for name in names if name in by_set},
        "parse_status": {name: status_counts(by_set.get(name, [])) for name in names},
        "failures": [dict(f) for f in failures],
    }


def add_extended_results(results: dict[str, Any], predictions: Sequence[Mapping[str, Any]],
                         perturbed: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> None:
    """Entries that need more than one set's rows or the sweep's: "threshold" (config
    calibrate_on), "face_crop" (counts), "robustness" (config perturb)."""
    by_set: dict[str, list[Mapping[str, Any]]] = {name: [] for name in results["sets"]}
    for p in predictions:
        by_set.setdefault(p["set"], []).append(p)
    if config.get("calibrate_on"):
        results["threshold"] = threshold_report(by_set, config["calibrate_on"])
    face = face_crop_counts(predictions)
    if face:
        results["face_crop"] = face
        if face["found"] == 0:  # a crop that never fired is a silent no-op: say so
            log.warning("--face-crop found no face in any of the %d video frames: every frame was scored whole",
                        face["frames"])
    if config.get("perturb"):
        results["robustness"] = robustness_results(results["sets"], perturbed,
                                                   parse_perturbations(config["perturb"]))


def write_report(
    out_dir: str,
    predictions: Sequence[Mapping[str, Any]],
    expected: Mapping[str, int],
    failures: Sequence[Mapping[str, Any]],
    checkpoint: Mapping[str, Any],
    config: Mapping[str, Any],
    plots: bool = True,
    extra: Mapping[str, Any] | None = None,
    perturbed: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Write every output into ``out_dir`` and return the results object
    (``extra``: more top-level entries of results.json, e.g. timings; ``perturbed``: the
    robustness sweep's rows of config["perturb"], written to predictions_perturbed.jsonl)."""
    os.makedirs(out_dir, exist_ok=True)
    predictions = sort_predictions(predictions)
    results = build_results(predictions, expected, failures, checkpoint, config)
    add_extended_results(results, predictions, perturbed, config)
    results.update(extra or {})
    warn_when_nothing_parsed(results)
    write_predictions(os.path.join(out_dir, "predictions.jsonl"), predictions)
    if perturbed:
        write_predictions(os.path.join(out_dir, PERTURBED_FILE), sort_predictions(perturbed))
    if plots:
        from pipeline.evaluation.plots import write_plots

        from pipeline.evaluation.diagnostic_plots import write_diagnostic_plots

        results["plots"] = write_plots(out_dir, predictions, results)
        results["plots"] += write_diagnostic_plots(out_dir, predictions, results)
    write_atomic(os.path.join(out_dir, "results.json"), json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    write_atomic(os.path.join(out_dir, "results.md"), render_markdown(results))
    return results


def rebuild(results_dir: str, plots: bool = True) -> dict[str, Any]:
    """Recompute results.json/.md and plots from an existing predictions.jsonl."""
    with open(os.path.join(results_dir, "results.json"), encoding="utf-8") as f:
        old = json.load(f)
    preds = read_predictions(os.path.join(results_dir, "predictions.jsonl"))
    perturbed_path = os.path.join(results_dir, PERTURBED_FILE)
    perturbed = read_predictions(perturbed_path) if os.path.isfile(perturbed_path) else []
    expected = {k: v["expected"] for k, v in old["counts"]["per_set"].items()}
    extra = {k: old[k] for k in RUN_ENTRIES if k in old}
    return write_report(results_dir, preds, expected, old["failures"], old["checkpoint"], old["config"], plots,
                        extra, perturbed)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="Rebuild results.json, results.md and plots of an evaluation run from its predictions.jsonl "
        "(e.g. after changing a metric), without running the model again."
    )
    ap.add_argument("results_dir", help="directory written by launch/eval.py")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = ap.parse_args(argv)
    results = rebuild(args.results_dir, plots=not args.no_plots)
    print(render_markdown(results))


if __name__ == "__main__":
    main()
