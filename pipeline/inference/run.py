"""A prediction run: the evaluation's model loading and scoring over the user's files.

Per rank: load the model once (pipeline.evaluation.runner.load_model, any
format fakereasoning-eval accepts, optionally quantized), decode this rank's
share of the inputs in loader workers (data.py), and score them in batches of
`batch_size` with the evaluation's Scorer, so an image gets the same answer
and p(fake) as `fakereasoning-eval` gives it under the same settings:
generation with the CPM's p(fake) read at the answer's own conclusion (one
full forward per concluded image, `generate_scored`), or, with
`detect_only`, one forward with the conclusion prefix forced after the prompt.
The answer is parsed by the protocol's parser and split into its four
sections; the verdict is p(fake) >= threshold (the answer's own conclusion is
`answer_verdict`; `disagree` flags the two differing). Records go to the
journal / the output (output.py); rank 0 writes the final file.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.evaluation.parsing import split_sections
from pipeline.evaluation.runner import Scorer, batch_seed, load_model
from pipeline.inference import output
from pipeline.inference.config import PredictConfig
from pipeline.inference.data import PredictImages, make_predict_loader
from pipeline.inference.evidence import AttentionCapture, Geometry, evidence_grid, render_overlay, top_regions
from pipeline.inference.inputs import Source, iter_inputs

log = logging.getLogger(__name__)

VERDICTS = {0: "real", 1: "fake"}


class PredictUsageError(ValueError):
    """A combination of settings that cannot run (the CLI exits with status 2)."""


@dataclass
class Summary:
    """What a run did (printed at the end; `scored` decides the exit status)."""

    scored: int = 0
    failed: int = 0
    already_done: int = 0
    fake: int = 0
    ignored_in_folders: int = 0
    seconds: float = 0.0
    """Wall seconds of the whole run (model loading included)."""
    scoring_seconds: float = 0.0
    """Wall seconds from the first decoded run to the last record (rank 0's; the
    speed figure comparable with fakereasoning-eval's images_per_s_scoring)."""
    reasons: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        share = f"{self.fake / self.scored:.1%}" if self.scored else "n/a"
        rate = self.scored / self.seconds if self.seconds > 0 else 0.0
        text = (f"predict: scored {self.scored}, failed {self.failed}, fake share {share}, "
                f"{rate:.2f} inputs/s")
        if self.already_done:
            text += f", {self.already_done} already in the output (resumed)"
        if self.ignored_in_folders:
            text += f", {self.ignored_in_folders} non-image files in folders ignored"
        if self.reasons:
            text += " | failures: " + ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items()))
        return text


def _world():
    """(rank, world, device): the launcher's world when there is one, else one
    process without a process group (two predictions on one machine must not
    compete for a rendezvous port)."""
    from pipeline.distributed import device as current_device

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from pipeline.distributed import init_distributed

        info = init_distributed()
        return info.rank, info.world_size, current_device()
    return 0, 1, current_device()


def verdict_of(p_fake: float | None, threshold: float) -> str | None:
    return None if p_fake is None else ("fake" if p_fake >= threshold else "real")


class Predictor:
    """Scores decoded samples into records (one model, one device). Shared by the
    command, the web demo and the tests: `predict_pil` scores one PIL image."""

    def __init__(self, cfg: PredictConfig, model, tokenizer, device: torch.device, sid: str):
        self.cfg = cfg
        self.scorer = Scorer(model, cfg, device, tokenizer)
        self.model = self.scorer.model
        self.sid = sid
        self.evidence_dir = Path(cfg.evidence) if cfg.evidence else None
        if self.evidence_dir is not None:
            self.evidence_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def load(cls, cfg: PredictConfig, device: torch.device | None = None) -> "Predictor":
        """Load cfg's checkpoint (as fakereasoning-eval does) onto `device` (default: the accelerator's)."""
        if device is None:
            from pipeline.distributed import device as current_device

            device = current_device()
        model, tokenizer, _fmt = load_model(cfg)
        return cls(cfg, model, tokenizer, device, output.settings_id(cfg.checkpoint, cfg.settings_record()))

    def score(self, samples: list[dict[str, Any]], streamer=None) -> list[dict[str, Any]]:
        """One record-part per sample (image fields; frames are grouped by the caller).
        streamer: receives the generated tokens as they come (full mode, one image)."""
        px = torch.stack([s["pixel_values"] for s in samples])
        # Only with --evidence: at the paper shape the map is B x 16 x 577 x 577 floats.
        capture = AttentionCapture(self.model) if self.evidence_dir is not None else contextlib.nullcontext()
        with capture as cap:
            if self.cfg.detect_only:
                p_fake, answers = self.scorer.p_fake_only(px), [None] * len(samples)
            else:
                seed = batch_seed(self.cfg.seed, {"set": "predict", "key": samples[0]["sha256"]})
                answers, p_fake, _ = self.scorer.answer_batch(px, seed, streamer)
        out = []
        for i, (s, answer, p) in enumerate(zip(samples, answers, p_fake)):
            p = None if math.isnan(p) else float(p)
            rec: dict[str, Any] = {"p_fake": p, "verdict": verdict_of(p, self.cfg.threshold)}
            if answer is not None:
                parsed = self.scorer.parse(answer)
                said = VERDICTS.get(parsed.pred)
                rec.update(answer=answer, sections=split_sections(answer), parse_status=parsed.parse_status,
                           answer_verdict=said,
                           disagree=bool(said is not None and rec["verdict"] is not None and said != rec["verdict"]))
            else:
                rec.update(answer=None, sections=None, parse_status="not_generated", answer_verdict=None,
                           disagree=False)
            if cap is not None and cap.attention is not None:
                rec["evidence"] = self._evidence(s, cap.attention[i])
            out.append(rec)
        return out

    def _evidence(self, s: dict[str, Any], attention: torch.Tensor) -> dict[str, Any]:
        grid = evidence_grid(attention)
        geo = Geometry(s["width"], s["height"])
        stem = f"{s['sha256'][:16]}-{Path(s['path']).stem[:60]}"
        if "frame" in s:
            stem += f"-frame{s['frame']:06d}"
        png, npy = self.evidence_dir / f"{stem}.png", self.evidence_dir / f"{stem}.npy"
        import numpy as np

        np.save(npy, grid)
        render_overlay(s["display"], grid, geo).save(png)
        return {"png": str(png), "npy": str(npy), "grid": list(grid.shape),
                "top_regions": top_regions(grid, geo, self.cfg.evidence_top)}

    def records(self, samples: list[dict[str, Any]], streamer=None) -> list[dict[str, Any]]:
        """Scored records of a run's samples, a video's frames grouped into one record."""
        parts: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for lo in range(0, len(samples), self.cfg.batch_size):
            chunk = samples[lo:lo + self.cfg.batch_size]
            parts.extend(zip(chunk, self.score(chunk, streamer)))
        out: list[dict[str, Any]] = []
        videos: dict[int, dict[str, Any]] = {}
        for s, part in parts:
            base = {"index": s["index"], "path": s["path"], "kind": s["kind"], "status": "ok",
                    "sha256": s["sha256"], "settings_id": self.sid, "threshold": self.cfg.threshold,
                    "mode": "detect_only" if self.cfg.detect_only else "full"}
            if "frame" not in s:
                out.append({**base, "width": s["width"], "height": s["height"], **part})
                continue
            v = videos.get(s["index"])
            if v is None:
                v = videos[s["index"]] = {**base, "n_frames": s["n_frames"], "frames": []}
                out.append(v)
            v["frames"].append({"frame": s["frame"], "width": s["width"], "height": s["height"], **part})
        for v in videos.values():
            # The evaluation's video rule (pipeline/evaluation/video.py): mean frame p(fake).
            ps = [f["p_fake"] for f in v["frames"] if f["p_fake"] is not None]
            v["p_fake"] = sum(ps) / len(ps) if ps else None
            v["verdict"] = verdict_of(v["p_fake"], self.cfg.threshold)
        return out


def _sources(cfg: PredictConfig, stdin_file: str | None) -> list[Source]:
    out = [Source(stdin_file, is_list=True) if s == "-" else Source(s) for s in cfg.inputs]
    if cfg.list_file is not None:
        out.append(Source(cfg.list_file, is_list=True))
    return out


def _spool_stdin() -> str:
    """Standard input's paths to a temporary list file, so every loader worker can read them."""
    fd, path = tempfile.mkstemp(prefix="fakereasoning-predict-stdin-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as fh:
        for line in sys.stdin:
            fh.write(line)
    return path


def _count(sources: list[Source]) -> tuple[int, int]:
    """(inputs, files ignored in folders): one cheap walk for the progress bar's total."""
    ignored = [0]
    n = sum(1 for _ in iter_inputs(sources, ignored))
    return n, ignored[0]


def _broadcast(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _lock_output(cfg: PredictConfig, rank: int, world: int):
    """Rank 0 holds OUT.lock (sharding/dir_lock.py, the training's lock) for the whole
    run, so a second prediction into the same file stops (PredictUsageError naming the
    holder) instead of finalizing, and deleting, the first one's journal."""
    from sharding.dir_lock import OutputLocked, acquire

    lock, error = None, None
    if rank == 0 and cfg.out is not None:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        try:
            lock = acquire(f"{cfg.out}.lock", "prediction")
        except OutputLocked as exc:
            error = str(exc)
    error = _broadcast(error, world)
    if error is not None:
        raise PredictUsageError(f"out: {error}")
    return lock


def run_predict(cfg: PredictConfig, emit=None) -> Summary:
    """Predict every input; returns rank 0's summary (other ranks: their own).

    emit: with `cfg.out` None, called with each record as it is ready (the CLI
    prints it); with an output file, records go to the journal and the file."""
    from modeling.image_processing import ImageProcessor

    t0 = time.perf_counter()
    rank, world, dev = _world()
    if world > 1 and cfg.out is None:
        raise PredictUsageError("out: required with several ranks (rank 0 writes the file)")
    stdin_file = _spool_stdin() if "-" in cfg.inputs and rank == 0 else None
    fmt = cfg.output_format()
    summary = Summary()
    lock = None
    completed = False
    try:
        lock = _lock_output(cfg, rank, world)
        model, tokenizer, _fmt = load_model(cfg)
        sid = output.settings_id(cfg.checkpoint, cfg.settings_record())
        planned: Any = None
        if rank == 0:
            try:
                if stdin_file is not None and world > 1:
                    raise PredictUsageError("inputs: '-' (standard input) works in a single process; use --list FILE")
                total, summary.ignored_in_folders = _count(_sources(cfg, stdin_file))
                if cfg.restart and cfg.out is not None:
                    output.remove_journal(cfg.out)
                done = (output.done_hashes(cfg.out, fmt, sid)
                        if cfg.out is not None and not cfg.restart and fmt != "text" else set())
                planned = (total, frozenset(done), output.new_attempt())
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                planned = exc
        planned = _broadcast(planned, world)
        if isinstance(planned, Exception):
            raise planned
        total, done, attempt = planned
        predictor = Predictor(cfg, model, tokenizer, dev, sid)
        dataset = PredictImages(_sources(cfg, stdin_file), ImageProcessor(model.config), cfg.batch_size, rank, world,
                                done, cfg.evidence is not None, cfg.video_fps, cfg.video_max_frames,
                                cfg.max_pixels, cfg.max_file_bytes, cfg.image_limits())
        journal = output.Journal(cfg.out, attempt, rank) if cfg.out is not None else None
        bar = tqdm(total=total, unit="input", desc="predict", disable=not (cfg.progress and rank == 0),
                   dynamic_ncols=True, file=sys.stderr)
        t_scoring = time.perf_counter()
        try:
            for run in make_predict_loader(dataset, cfg.num_workers):
                records = run["records"] + (predictor.records(run["samples"]) if run["samples"] else [])
                records.sort(key=lambda r: r["index"])
                _count_records(summary, records)
                summary.already_done += run["skipped"]
                if journal is not None:
                    journal.write(records)
                elif emit is not None:
                    for rec in records:
                        emit(rec)
                bar.update(len({r["index"] for r in records}) + run["skipped"])
        finally:
            bar.close()
            if journal is not None:
                journal.close()
        scoring_seconds = time.perf_counter() - t_scoring
        summary = _reduce(summary, world)
        summary.scoring_seconds = scoring_seconds
        if rank == 0 and cfg.out is not None:
            output.finalize(cfg.out, fmt, cfg.restart)
        completed = True
    finally:
        if lock is not None:
            lock.release()
        if stdin_file is not None:
            os.unlink(stdin_file)
        if world > 1:
            from pipeline.distributed import shutdown

            shutdown(completed)
    summary.seconds = time.perf_counter() - t0
    return summary


def _count_records(summary: Summary, records: list[dict[str, Any]]) -> None:
    for rec in records:
        if rec["status"] == "ok":
            summary.scored += 1
            summary.fake += rec.get("verdict") == "fake"
        else:
            summary.failed += 1
            reason = str(rec.get("reason", "")).split(":", 1)[0]
            summary.reasons[reason] = summary.reasons.get(reason, 0) + 1
            print(f"predict: {rec['path']}: {rec.get('reason')}", file=sys.stderr)


def _reduce(summary: Summary, world: int) -> Summary:
    """Rank 0's summary over all ranks (also the barrier before rank 0 writes the file)."""
    if world == 1:
        return summary
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, summary)
    total = Summary(ignored_in_folders=summary.ignored_in_folders)
    for p in parts:
        total.scored += p.scored
        total.failed += p.failed
        total.fake += p.fake
        total.already_done += p.already_done
        for k, v in p.reasons.items():
            total.reasons[k] = total.reasons.get(k, 0) + v
    return total
