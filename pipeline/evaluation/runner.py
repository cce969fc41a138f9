"""The evaluation run: load the model once per rank, score this rank's images in
batches, gather to rank 0, write the report, log to W&B.

Each rank holds a full copy of the model (inference needs no ZeRO partitioning:
the 13B model in bf16 fits a 40 GB GPU), so ranks never wait for each other
until the final gather; `deepspeed` (or torchrun) is only the process launcher.
Per batch: greedy (or sampled) generation with left padding; the CPM's p(fake)
at the answer's own "<CONCLUSION>This image is" is read from the logits
generation computed there, and only answers without one (it is forced after
them) get one more forward over prompt + answer (model.generate_scored;
results.json "run" counts the full forwards per image). CSS runs after
generation on the rank's texts, with the CLIP text model loaded once per
process.

The protocol (EvalConfig.protocol) picks the prompt conversation, decoding
settings, parser, selection and CSS of an empty hypothesis; results.json
"protocol" records what ran. Sampling is seeded per batch from cfg.seed and the
batch's first image (`batch_seed`), and batches are cut at fixed positions of
the whole image list (data.rank_slice), so a sampled run gives the same answers
with any number of ranks or loader workers (on the same kind of device).

Every finished batch is written to cfg.out/partial/ (resume.py), and a rerun
with the same settings scores only the batches not found there, split among
its ranks: a killed run resumes with any number of ranks and ends with the
results of an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.evaluation import resume
from pipeline.evaluation.config import EvalConfig
from pipeline.evaluation.data import expected_counts, make_eval_loader, plan_items
from pipeline.evaluation.metrics import CSSScorer, text_scores
from pipeline.evaluation.parsing import PARSERS
from pipeline.evaluation.report import checkpoint_identity, write_report
from pipeline.evaluation.wandb_log import log_eval
from sharding.schema import EVAL_QUESTION

log = logging.getLogger(__name__)

def load_model(cfg):
    """(model, tokenizer, format) for this project's formats or the reference's.

    cfg: an EvalConfig or a PredictConfig (fields checkpoint, dtype,
    reference_base_model, and optionally quantize: the LLM's linear layers
    loaded in 8 or 4 bits, modeling.checkpoints.quantization)."""
    from modeling.checkpoints.checkpoint import checkpoint_format, import_reference, load_for_inference
    from modeling.config import ModelConfig

    d = Path(cfg.checkpoint)
    if checkpoint_format(d) == "reference":
        base = ModelConfig.preset("paper")
        if cfg.dtype:
            base = ModelConfig.from_dict({"dtype": cfg.dtype}, base=base)
        model, tok = import_reference(d, base, base_model_dir=cfg.reference_base_model)
        fmt = "reference"
    else:
        overrides = {"dtype": cfg.dtype} if cfg.dtype else None
        model, tok = load_for_inference(d, overrides)
        fmt = "fakereasoning"
    bits = getattr(cfg, "quantize", None)
    if bits:
        from modeling.checkpoints.quantization import quantize_llm

        quantize_llm(model, bits)
    return model, tok, fmt


def batch_seed(seed: int, first_sample: dict[str, Any]) -> int:
    """Sampling seed of a batch: from the run's seed and the batch's first image
    (set and key), never from the rank, so it is the same in any world size."""
    text = f"{seed}/{first_sample['set']}/{first_sample['key']}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 1


class Scorer:
    """Generation + parsing + p(fake) for batches of images (one model, one device).

    cfg: an EvalConfig, or any settings object with `protocol`, `seed` and
    `generation()` (pipeline.inference's PredictConfig), so the prediction
    command scores exactly as the evaluation does."""

    def __init__(self, model, cfg, device: torch.device, tokenizer=None, one_pass: bool = True):
        """one_pass False: the two-pass way (generate, then score_p_fake's forward for
        every answer), the same p(fake) at one more forward per image; kept as the
        baseline of benchmarks/bench_eval.py and of the equality tests."""
        self.model = model.to(device).eval()
        self.cfg = cfg
        self.device = device
        self.one_pass = one_pass
        # Full forwards (towers, fusion, LLM over the whole prompt) run so far, and the
        # images they were for: generation's prefill is 1, a forced CPM forward 1 more.
        self.images = self.forwards = 0
        self.parse = PARSERS[cfg.protocol]
        self.settings = cfg.generation()
        from modeling.template import build_prompt

        tok = tokenizer if tokenizer is not None else self.model.tokenizer
        # Prompt ids built here (the model's own str path always uses Vicuna v1).
        self.prompt_ids = build_prompt(tok, EVAL_QUESTION, conversation=self.settings["conversation"])[0]

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of model.generate: the protocol's decoding settings.
        top_p None (no nucleus filtering) is passed as 1.0, which transformers treats
        the same, so a checkpoint's generation_config cannot put a threshold back."""
        g = self.settings
        sample = g["temperature"] > 0
        return {"max_new_tokens": g["max_new_tokens"], "do_sample": sample,
                "temperature": g["temperature"] if sample else 1.0,
                "top_p": 1.0 if g["top_p"] is None else g["top_p"], "num_beams": g["num_beams"]}

    @torch.inference_mode()
    def answer_batch(self, pixel_values: torch.Tensor, seed: int,
                     streamer=None) -> tuple[list[str], list[float], list[int]]:
        """(answers, p_fake, full forwards) per image of a batch: the protocol's
        generation with the CPM's p(fake) (NaN where none), `seed` set first.
        streamer: a transformers streamer receiving the new tokens as they are
        generated (the web demo's live answer; the tokens are the same)."""
        px = pixel_values.to(self.device)
        prompts = [list(self.prompt_ids) for _ in range(px.shape[0])]
        torch.manual_seed(seed)
        if self.one_pass:
            extra = {"streamer": streamer} if streamer is not None else {}
            scored = self.model.generate_scored(px, prompts, **self.generate_kwargs(), **extra)
            answers, p_fake, forwards = scored.texts, scored.p_fake, scored.forwards
        else:
            answers = self.model.generate(px, prompts, **self.generate_kwargs())
            p_fake, forwards = self.model.score_p_fake(px, prompts, answers), [2] * px.shape[0]
        self.images += px.shape[0]
        self.forwards += sum(forwards)
        return answers, p_fake.float().cpu().tolist(), list(forwards)

    @torch.inference_mode()
    def p_fake_only(self, pixel_values: torch.Tensor) -> list[float]:
        """p(fake) per image without an answer: one forward with the conclusion
        prefix forced right after the prompt (model.score_p_fake with no answer).
        The model was trained with the reasoning before the conclusion, so this
        is out of its training distribution (benchmarks/bench_predict.py measures
        what it costs in accuracy)."""
        px = pixel_values.to(self.device)
        prompts = [list(self.prompt_ids) for _ in range(px.shape[0])]
        p_fake = self.model.score_p_fake(px, prompts, None)
        self.images += px.shape[0]
        self.forwards += px.shape[0]
        return p_fake.float().cpu().tolist()

    def score_batch(self, pixel_values: torch.Tensor, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        answers, p_fake, _ = self.answer_batch(pixel_values, batch_seed(self.cfg.seed, samples[0]))
        rows = []
        for s, answer, p in zip(samples, answers, p_fake):
            parsed = self.parse(answer)
            rows.append({
                "key": s["key"], "set": s["set"], "generator": s["generator"], "label": s["label"],
                "pred": parsed.pred, "parse_status": parsed.parse_status,
                "p_fake": None if math.isnan(p) else float(p), "reasoning": parsed.reasoning,
                "reference": s["reference"], "answer": answer, "relpath": s["relpath"],
                "shard": s["shard"], "index": s["index"], "video": s.get("video"),
                **({"face_found": s["face_found"]} if "face_found" in s else {}),
            })
        return rows


def score_items(scorer: Scorer, items, image_processor, cfg: EvalConfig, show_progress: bool,
                perturbed: list[dict[str, Any]] | None = None, on_batch=None):
    """(prediction rows without text scores, failure records) of a list of items.

    perturbed: when a list, cfg's robustness sweep runs too and its rows (field
    `perturbation`) are appended to it; each batch is decoded once for all of them
    and every variant of a batch gets the batch's seed, so only the image differs.
    on_batch: called after every batch with its (rows, failures, perturbed rows,
    forwards, scored images), e.g. resume.PartialWriter."""
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    sweep = cfg.perturbations() if perturbed is not None else []
    loader = make_eval_loader(items, image_processor, cfg.batch_size, cfg.num_workers, sweep, cfg.face_crop,
                              cfg.image_limits())
    bar = tqdm(total=len(items), unit="img", desc="eval", disable=not show_progress, dynamic_ncols=True)
    try:
        for batch in loader:
            marks = (len(rows), len(failures), len(perturbed or ()), scorer.forwards, scorer.images)
            for f in batch["failures"]:
                failures.append({**f, "reason": f.pop("error")})
            if batch["samples"]:
                rows.extend(scorer.score_batch(batch["pixel_values"], batch["samples"]))
                for p, px in zip(sweep, batch["perturbed_pixel_values"]):
                    perturbed.extend({**r, "perturbation": p.name} for r in scorer.score_batch(px, batch["samples"]))
            if on_batch is not None:
                on_batch(rows[marks[0]:], failures[marks[1]:], (perturbed or [])[marks[2]:],
                         scorer.forwards - marks[3], scorer.images - marks[4])
            bar.update(len(batch["samples"]) + len(batch["failures"]))
    finally:
        bar.close()
    return rows, failures


def forwards_per_image(per_rank: list[dict[str, Any]]) -> float | None:
    """Full model forwards per scored image over all ranks (1: p(fake) always read
    from generation; 2: a forced CPM forward for every image); None without images."""
    images = sum(p["scored"] for p in per_rank)
    return sum(p["forwards"] for p in per_rank) / images if images else None


def run_counts(per_rank: list[dict[str, Any]], earlier: list[resume.BatchRecord]) -> dict[str, Any]:
    """results.json "run" entries from the ranks' timings and the batches taken from
    earlier partial output: speed of this run's scoring, forwards per image of all."""
    resumed = {"scored": sum(r.scored for r in earlier), "forwards": sum(r.forwards for r in earlier)}
    images = sum(p["images"] for p in per_rank)
    return {"per_rank": per_rank,
            "images_per_s_scoring": images / max(max(p["generate_s"] for p in per_rank), 1e-9),
            "forwards_per_image": forwards_per_image(per_rank + [resumed]),
            "resumed_images": sum(r.images for r in earlier)}


def add_text_scores(rows: list[dict[str, Any]], css: CSSScorer | None) -> None:
    scores = text_scores([r["reference"] for r in rows], [r["reasoning"] for r in rows], css)
    for r, s in zip(rows, scores):
        r.update(s)


def _gather(obj: Any, rank: int, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    out = [None] * world_size if rank == 0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out or []


def _broadcast(obj: Any, world_size: int) -> Any:
    if world_size == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def plan(cfg: EvalConfig):
    """(items, selection record) of a run; raises when the reference protocol's
    JSON-order selection is asked of shards that do not record the order."""
    items, selection = plan_items(cfg.sets(), cfg.limit, cfg.max_per_class, cfg.reasoning_sets())
    for name in cfg.reasoning_sets():
        old = selection[name].without_reasoning_index
        if cfg.max_per_class is not None and old:
            raise RuntimeError(
                f"set {name!r}: {old} images come from shards without metadata 'reasoning_index' (written "
                "before it existed), so the reference protocol cannot take the first --max-per-class images "
                "in <gen>_reasoning.json order; re-shard with sharding/shard_mmfr.py, or drop --max-per-class")
    return items, {name: asdict(sel) for name, sel in selection.items()}


def run_eval(cfg: EvalConfig) -> dict[str, Any] | None:
    """Evaluate on every rank of the launched world; returns the results on rank 0.

    Rank 0 holds `cfg.out`/run.lock (sharding/dir_lock.py, the training's lock)
    for the whole run: a second evaluation into the same folder raises
    OutputLocked on every rank, naming the holder, instead of picking the same
    attempt number and appending to the same files."""
    from pipeline.distributed import init_distributed
    from sharding.dir_lock import LOCK_FILE, OutputLocked, acquire

    cfg.validate()
    info = init_distributed()
    lock, error = None, None
    if info.rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        try:
            lock = acquire(os.path.join(cfg.out, LOCK_FILE), "evaluation")
        except OutputLocked as exc:
            error = str(exc)
    try:
        error = _broadcast(error, info.world_size)
        if error is not None:
            raise OutputLocked(error)
        return _run_locked(cfg, info)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(cfg: EvalConfig, info) -> dict[str, Any] | None:
    from modeling.image_processing import ImageProcessor
    from pipeline.distributed import device as current_device

    rank, world = info.rank, info.world_size
    torch.manual_seed(cfg.seed)
    dev = current_device()
    t0 = time.perf_counter()
    # Rank 0 plans (selection reads every sample's metadata), hashes the weights and
    # reads the partial output, before any rank writes; every rank gets the same
    # plan, and an error (a resume mismatch too) reaches every rank instead of
    # leaving them waiting. The finished batches' records stay on rank 0.
    planned: Any = None
    state: resume.ResumeState | None = None
    if rank == 0:
        try:
            items, selection = plan(cfg)
            # Identity first: a report that cannot say which weights it scored is not written.
            identity = checkpoint_identity(cfg.checkpoint)
            state = resume.prepare(cfg, items, identity, restart=cfg.restart)
            planned = (items, selection, sorted(state.done), state.attempt)
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            planned = exc
    planned = _broadcast(planned, world)
    if isinstance(planned, Exception):
        raise planned
    items, selection, done, attempt = planned
    starts = resume.split_starts(resume.remaining_starts(len(items), cfg.batch_size, done), rank, world)
    mine = resume.items_of(items, starts, cfg.batch_size)
    model, tokenizer, fmt = load_model(cfg)
    t_load, c_load = time.perf_counter(), time.process_time()
    scorer = Scorer(model, cfg, dev, tokenizer)
    writer = resume.PartialWriter(resume.partial_dir(cfg.out), attempt, rank, world, items, cfg.batch_size)
    try:
        rows, _ = score_items(scorer, mine, ImageProcessor(model.config, cfg.image_limits()), cfg,
                              show_progress=cfg.progress and rank == 0, perturbed=[], on_batch=writer)
    finally:
        writer.close()
    t_gen, c_gen = time.perf_counter(), time.process_time()
    css = (CSSScorer(cfg.css_model, device=str(dev), batch_size=cfg.css_batch_size,
                     embed_empty=cfg.protocol == "reference") if cfg.css_model else None)
    add_text_scores(rows, css)  # the writer's records hold these same row objects
    t_text, c_text = time.perf_counter(), time.process_time()
    # CPU seconds next to wall seconds: on a shared machine they show the work
    # each rank did even when ranks competed for cores.
    timing = {"rank": rank, "images": len(mine), "load_s": t_load - t0, "generate_s": t_gen - t_load,
              "text_metrics_s": t_text - t_gen, "generate_cpu_s": c_gen - c_load,
              "text_metrics_cpu_s": c_text - c_gen, "scored": scorer.images, "forwards": scorer.forwards}
    gathered = _gather((writer.records, timing), rank, world)
    if rank != 0:
        return None
    earlier = list(state.done.values())
    add_text_scores([r for rec in earlier for r in rec.rows], css)
    all_rows, all_failures, perturbed, _, _ = resume.merge(earlier + [r for g in gathered for r in g[0]])
    run = {"world_size": world, "backend": info.backend, "device": str(dev), "checkpoint_format": fmt,
           "seconds": time.perf_counter() - t0, **run_counts([g[1] for g in gathered], earlier)}
    results = write_report(cfg.out, all_rows, expected_counts(items), all_failures, identity,
                           cfg.to_dict(), plots=cfg.plots,
                           extra={"run": run, "protocol": cfg.protocol_record(), "selection": selection},
                           perturbed=perturbed)
    log_eval(cfg, results, all_rows)
    if fmt != "reference":
        refresh_model_card(cfg.checkpoint, results)
    return results


def refresh_model_card(checkpoint: str, results: dict[str, Any]) -> None:
    """Write the results into the export's model card (README.md), when it has one.

    Only weight files enter the checkpoint's sha256 (report.checkpoint_identity),
    so the card can change without changing the identity. A read-only checkpoint
    folder (a shared release) keeps its card; the results are in `cfg.out` anyway.
    """
    from modeling.checkpoints.model_card import CARD_FILE, update_card_evaluation

    if not (Path(checkpoint) / CARD_FILE).is_file():
        return
    try:
        path = update_card_evaluation(checkpoint, results)
        log.info("model card updated with the evaluation: %s", path)
    except OSError as e:
        log.warning("model card of %s not updated (%s); the results are in the eval folder", checkpoint, e)

