"""W&B logging of an evaluation (rank 0): one run of job_type "eval" in the
experiment of the checkpoint it scored.

The run joins the training run's group without the user naming it: the export
(<output_dir>/export/merged or trainable) sits under the training output folder,
whose run_info.json (pipeline/training/run.py) records the training run's id and
group. A checkpoint from elsewhere (a copy, the reference's release) gets the
group "checkpoint-<sha256 prefix>", so the evaluations of the same weights still
group together; an explicit `wandb.group` wins over both. The config carries the
checkpoint's path and sha256 (report.checkpoint_identity, already in results),
and an online run also declares the checkpoint a used "model" artifact
referencing its files (file:// reference, nothing uploaded); wandb refuses
use_artifact offline, where the config is the link.

Logged: per set and convention a table whose numeric columns are numbers (pct
columns x100 like results.md, None when undefined), so W&B can sort and plot
them; a sample of predictions with a thumbnail of their image (at most
THUMBNAIL_PX on its longer side, and only for sets whose terms allow showing
their images: `image_sets`); the report's PNG plots as images; the set
averages and counts in the summary. Any W&B failure is logged and never fails
the evaluation.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.evaluation.config import EvalConfig
from pipeline.tracking import Tracker, experiment_group, start_tracking

log = logging.getLogger(__name__)

RUN_INFO = "run_info.json"
"""Written by pipeline/training/run.py into the training output folder."""
THUMBNAIL_PX = 256
"""Longer side of the prediction images sent to W&B (never the full-resolution file)."""
BENCHMARK_FILE = "benchmark.json"
"""Written by `python -m sharding.eval_sets` into a benchmark's output folder (names the benchmark)."""


def _folder_and_parents(folder: str, levels: int = 2) -> list[str]:
    """`folder` (absolute) and its first `levels` parents, nearest first."""
    out = [os.path.abspath(folder)]
    for _ in range(levels):
        out.append(os.path.dirname(out[-1]))
    return out


def _registered_benchmark(folder: str) -> str | None:
    """The registry name recorded in the benchmark.json of `folder` or its two parents."""
    for path in (os.path.join(f, BENCHMARK_FILE) for f in _folder_and_parents(folder)):
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    return (json.load(f).get("arguments") or {}).get("benchmark")
            except (OSError, ValueError, AttributeError):
                return None
    return None


def image_sets(cfg: EvalConfig) -> dict[str, bool]:
    """Set name -> whether its images may be shown in W&B: the MMFR set yes; a benchmark
    only when its shards name a registered benchmark whose terms allow it
    (sharding/eval_sets/registry.py `redistributable`: off for ffpp and celeb-df); a
    set of unknown origin no."""
    from sharding.eval_sets.registry import BENCHMARKS

    allowed = {cfg.set_name: True} if cfg.shards else {}
    for name, path in cfg.benchmarks.items():
        bench = BENCHMARKS.get(_registered_benchmark(path) or "")
        allowed[name] = bool(bench and bench.redistributable)
    return allowed


def upload_description(cfg: EvalConfig) -> str:
    """What an online eval run sends (the line pipeline.tracking prints)."""
    shown = [n for n, ok in image_sets(cfg).items() if ok]
    withheld = [n for n, ok in image_sets(cfg).items() if not ok]
    return (f"metric tables, the report's plots, and up to {cfg.wandb_samples} predictions with "
            f"{THUMBNAIL_PX}-px thumbnails of {', '.join(shown) or 'no set'}"
            + (f" (no images of {', '.join(withheld)}: their terms forbid it or their origin is unknown)"
               if withheld else ""))


def training_run(checkpoint_path: str) -> dict[str, str] | None:
    """{"output_dir", "run_id", "group"} of the training run a checkpoint came from,
    or None. run_info.json is looked for in the checkpoint folder and its two
    parents (<output_dir>/export/merged -> <output_dir>); a run_info.json from
    before groups were recorded falls back to the default experiment group."""
    for folder in _folder_and_parents(checkpoint_path):
        path = os.path.join(folder, RUN_INFO)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    info = json.load(f)
            except (OSError, ValueError) as e:
                log.warning("%s: unreadable (%s); the W&B eval run is not linked to its training run", path, e)
                return None
            run_id = info.get("wandb_run_id")
            if run_id:
                return {"output_dir": folder, "run_id": run_id,
                        "group": info.get("wandb_group") or experiment_group(folder, run_id)}
    return None


def default_group(identity: Mapping[str, Any], training: Mapping[str, str] | None) -> str:
    """The training run's group, else one per checkpoint content."""
    return training["group"] if training else f"checkpoint-{identity['sha256'][:12]}"


def artifact_name(identity: Mapping[str, Any]) -> str:
    """Named by content: the same weights are the same artifact wherever they lie."""
    return f"checkpoint-{identity['sha256'][:16]}"


def run_config(cfg: EvalConfig, identity: Mapping[str, Any], training: Mapping[str, str] | None) -> dict[str, Any]:
    """The eval run's W&B config: the EvalConfig plus which weights were scored."""
    return {**cfg.to_dict(), "checkpoint_path": identity["path"], "checkpoint_sha256": identity["sha256"],
            "checkpoint_files": identity["files"], "checkpoint_artifact": artifact_name(identity),
            "training_run": dict(training) if training else None}


def checkpoint_artifact(identity: Mapping[str, Any]):
    """A "model" artifact referencing the checkpoint's files in place (file://).
    checksum=False: W&B keys each entry by its path instead of reading gigabytes
    of weights again; the sha256 in the name and metadata says what they hold."""
    import wandb

    artifact = wandb.Artifact(artifact_name(identity), type="model",
                              metadata={"sha256": identity["sha256"], "files": identity["files"]})
    artifact.add_reference(f"file://{identity['path']}", checksum=False)
    return artifact


def metric_tables(results: Mapping[str, Any]) -> dict[str, Any]:
    """eval/<set>/<convention>: generators, average and all-images rows, numeric cells."""
    import wandb

    from pipeline.evaluation.report import REFERENCE_COLUMNS, STRICT_COLUMNS
    from pipeline.evaluation.table_format import table_value

    tables = {}
    for name, m in results["sets"].items():
        rows = [(g, m["generators"][g]) for g in m["order"]] + [("average", m["average"]),
                                                                   ("all images", m["pooled"])]
        for conv, columns in (("reference", REFERENCE_COLUMNS), ("strict", STRICT_COLUMNS)):
            headers = [h if kind != "pct" or "%" in h else f"{h} %" for _, h, kind in columns]
            table = wandb.Table(columns=["generator", *headers])
            for g, vals in rows:
                table.add_data(g, *[table_value(vals[k], kind) for k, _, kind in columns])
            tables[f"eval/{name}/{conv}"] = table
    return tables


def thumbnail(data: bytes):
    """The image as RGB, its longer side at most THUMBNAIL_PX (never enlarged)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (THUMBNAIL_PX, THUMBNAIL_PX))  # JPEG: decode at a reduced scale
        small = im.convert("RGB")
    small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.BICUBIC)
    return small


def predictions_table(rows: Sequence[Mapping[str, Any]], samples: int, shown: Mapping[str, bool] | None = None):
    """Every len/samples-th prediction with a thumbnail of its image (at most `samples`);
    rows of a set that `shown` does not allow get no image (None: every set allowed)."""
    import wandb

    from pipeline.evaluation.data import read_images

    step = max(1, len(rows) // max(1, samples))
    sample = list(rows[::step][:samples])
    allowed = [shown is None or bool(shown.get(r["set"])) for r in sample]
    images = read_images([(r["shard"], r["index"]) for r, ok in zip(sample, allowed) if ok])
    images_iter = iter(images)
    images = [next(images_iter) if ok else None for ok in allowed]
    table = wandb.Table(columns=["image", "set", "generator", "label", "pred", "parse_status", "p_fake",
                                 "answer", "reference"])
    for r, data in zip(sample, images):
        img = wandb.Image(thumbnail(data)) if data else None
        table.add_data(img, r["set"], r["generator"], r["label"], r["pred"], r["parse_status"], r["p_fake"],
                       r["answer"], r["reference"])
    return table


def plot_images(out_dir: str, results: Mapping[str, Any]) -> dict[str, Any]:
    """eval/plots/<file stem>: each PNG the report wrote (results["plots"])."""
    import wandb

    return {f"eval/plots/{os.path.splitext(name)[0]}": wandb.Image(os.path.join(out_dir, name), caption=name)
            for name in results.get("plots", [])}


def summary_values(results: Mapping[str, Any]) -> dict[str, Any]:
    """Set averages (numbers; undefined ones left out) and the image counts."""
    summary: dict[str, Any] = {"eval/counts": results["counts"]}
    for name, m in results["sets"].items():
        summary.update({f"eval/{name}/average/{k}": v for k, v in m["average"].items() if v is not None})
    return summary


def _log(tracker: Tracker, cfg: EvalConfig, results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> None:
    if not tracker.use_artifact(checkpoint_artifact(results["checkpoint"])):
        log.info("W&B %s run: the checkpoint is linked by its sha256 in the config only", tracker.mode)
    payload = {**metric_tables(results), "eval/predictions": predictions_table(rows, cfg.wandb_samples,
                                                                                image_sets(cfg)),
               **plot_images(cfg.out, results)}
    tracker.log(payload, step=0)
    tracker.summary(summary_values(results))


def log_eval(cfg: EvalConfig, results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str | None:
    """Log a finished evaluation (results as write_report returned them); returns
    the run's folder (None when tracking is off). Never raises for W&B's sake."""
    identity = results["checkpoint"]
    training = training_run(identity["path"])
    tracker = start_tracking(cfg.wandb, cfg.wandb.dir or cfg.out, run_config(cfg, identity, training),
                             is_main=True, job_type="eval", group=default_group(identity, training),
                             uploads=upload_description(cfg))
    if not tracker.active:
        return None
    try:
        _log(tracker, cfg, results, rows)
    except Exception as exc:  # noqa: BLE001 - tracking never fails an evaluation
        log.warning("W&B logging of the evaluation failed: %s", exc)
    finally:
        tracker.finish()
    return tracker.run_dir
