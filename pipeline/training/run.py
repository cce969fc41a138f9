"""One training run, start to end: process group, tokenizer, model under ZeRO,
engine, resume, tracking, the loop, the final checkpoint and the export.

`train(cfg)` is what `launch/train.py` hands off to; every rank runs it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time

import torch
import yaml

from modeling.vision import torch_dtype
from pipeline import distributed as dist
from pipeline.process_signals import STOP_SIGNALS, signal_numbers
from pipeline.training.config import TrainConfig
from pipeline.training import checkpoint_space as space
from pipeline.training import checkpointing as ckpt
from common.atomic_files import new_dir_beside, replace_dir, write_atomic
from pipeline.training import preemption
from pipeline.training.batch import plan_for, resume_note
from pipeline.training.loop import CpmWatch, LoopContext, device_peak_flops, run_loop
from pipeline.training.lr_schedule import build_schedule

log = logging.getLogger("pipeline.training")


# --------------------------------------------------------------------------- tokenizer

def resolve_cpm_prefix(cfg: TrainConfig, info: dist.DistInfo) -> str:
    """The conclusion prefix the CPM trains on, decided on rank 0 and broadcast.

    model.cpm.answer_prefix="auto" takes the most common spelling in the first
    cpm_check.prefix_samples answers of the training shards, so the forced prefix
    stored with the checkpoint (and used by evaluation) is the one the data has.
    An explicit prefix is checked against the same answers: one that occurs in
    none of them is an error, since the CPM would never find its position.
    """
    from modeling.cpm import prefix_spellings
    from pipeline.data.corpus import shard_corpus

    c = cfg.model.cpm
    decision: tuple[str | None, str | None] = (None, None)
    if info.is_main and c.enabled and c.weight > 0:  # the same rule as the loop's CpmWatch
        wanted = c.resolved_prefix
        try:
            answers = list(shard_corpus(cfg.data.train_shards, cfg.cpm_check.prefix_samples, roles=("gpt",),
                                        purpose="model.cpm.answer_prefix is checked against the training answers",
                                        remedy="check data.train_shards", sizes_file=cfg.data.sizes_file))
            counts = prefix_spellings(answers, wanted)
            if not counts:
                decision = (None, f"none of the first {len(answers)} training answers of {cfg.data.train_shards} "
                                  f"contains the CPM conclusion {wanted!r} followed by real/fake (in any "
                                  f"whitespace); the CPM loss would be zero. Set model.cpm.answer_prefix to "
                                  f"the text before the decision word in your answers, or model.cpm.enabled=false")
            else:
                spelling, n = counts.most_common(1)[0]
                found = sum(counts.values())
                chosen = spelling if c.answer_prefix == "auto" else c.answer_prefix
                log.info("CPM conclusion prefix %r (%s): %d of %d answers read spell it %r; %d have a conclusion "
                         "in some whitespace variant; spellings: %s", chosen,
                         "from the data" if c.answer_prefix == "auto" else "from the config", n, len(answers),
                         spelling, found, dict(counts.most_common(5)))
                if c.answer_prefix != "auto" and spelling != c.answer_prefix:
                    log.warning("model.cpm.answer_prefix=%r but the training answers mostly spell it %r: positions "
                                "are still found, but evaluation will force the configured spelling",
                                c.answer_prefix, spelling)
                decision = (chosen, None)
        except (FileNotFoundError, ValueError) as e:
            decision = (None, str(e))
    prefix, error = dist.broadcast_object(decision)
    if error is not None:
        raise ValueError(error)
    return prefix if prefix is not None else c.resolved_prefix


def prepare_tokenizer(cfg: TrainConfig, info: dist.DistInfo):
    """The configured tokenizer, or (rank 0 builds, the others wait) a BPE built
    from the shards under <output_dir>/tokenizer; an existing one is reused, so a
    resumed run tokenises exactly as before."""
    from modeling.tokenization.loading import load_tokenizer

    path = cfg.tokenizer.path
    if path is None:
        path = os.path.join(cfg.output_dir, "tokenizer")
        if info.is_main and not os.path.isfile(os.path.join(path, "tokenizer.json")):
            from modeling.tokenization.tokenizer import build_bpe_tokenizer
            from pipeline.data.corpus import tokenizer_corpus

            corpus = tokenizer_corpus(cfg.data.train_shards, cfg.tokenizer.corpus_samples, cfg.data.sizes_file)
            staged = new_dir_beside(path)  # a fresh, unpredictable name: nothing planted there is followed
            build_bpe_tokenizer(corpus, staged, vocab_size=cfg.tokenizer.vocab_size,
                                model_max_length=cfg.data.max_length)
            replace_dir(staged, path)
            log.info("built a %d-token BPE tokenizer in %s", cfg.tokenizer.vocab_size, path)
        dist.barrier()
    return load_tokenizer(path)


# --------------------------------------------------------------------------- model

def build_model(cfg: TrainConfig, tokenizer, skip_init: bool = False):
    """The model (seeded). skip_init: its weights are about to be overwritten
    (the export loads the gathered state), so skip the initialisers."""
    import contextlib

    from modeling.checkpoints.tensor_io import skip_weight_init
    from modeling.model import FakeReasoningModel

    torch.manual_seed(cfg.loop.seed)
    with skip_weight_init() if skip_init else contextlib.nullcontext():
        model = FakeReasoningModel.from_config(cfg.model, tokenizer)
    if cfg.loop.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def total_optimizer_steps(cfg: TrainConfig, batches_per_epoch: int, grad_accum: int) -> int:
    if cfg.loop.max_steps is not None:
        return cfg.loop.max_steps
    return max(1, math.floor(cfg.loop.epochs * batches_per_epoch / grad_accum))


def write_run_files(cfg: TrainConfig, ds_config: dict) -> None:
    os.makedirs(cfg.output_dir, exist_ok=True)
    write_atomic(os.path.join(cfg.output_dir, "train_config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    dist.write_deepspeed_config(ds_config, cfg.checkpoint_dir)


# --------------------------------------------------------------------------- the run

def stop_with_checkpoint(cfg: TrainConfig, info: dist.DistInfo, state: ckpt.TrainState,
                         stops: preemption.StopRequests, save, tracker, total: int) -> None:
    """Every rank, after the loop left on a stop request: a complete checkpoint of
    this step (unless the loop just wrote one), rank 0's PREEMPTED marker, then
    Preempted (exit status 75). The export is left to the resumed run."""
    tag = ckpt.tag_for(state.global_step)
    if not ckpt.is_complete(cfg.checkpoint_dir, tag):
        save(state)
    reasons = dist.all_gather_objects(stops.reason)
    path = os.path.join(cfg.checkpoint_dir, tag)
    if info.is_main:
        requested = {r: why for r, why in enumerate(reasons) if why}
        marker = preemption.write_marker(cfg.output_dir, {
            "step": state.global_step, "total_steps": total, "checkpoint": path,
            "complete": ckpt.is_complete(cfg.checkpoint_dir, tag), "samples_seen": state.samples_seen,
            "requested_by_rank": requested})
        tracker.summary({"preempted/global_step": state.global_step})
        tracker.mark_preempting()
        log.warning("stopped at step %d of %d with a complete checkpoint %s (requested: %s); wrote %s. Exit "
                    "status %d; continue with checkpoint.resume=auto (--resume auto)", state.global_step, total,
                    path, requested, marker, preemption.EXIT_PREEMPTED)
    dist.barrier()  # the marker is there before any rank exits (the launcher then ends the others)
    stops.done()
    raise preemption.Preempted(f"stopped at step {state.global_step} with the checkpoint {path} "
                               f"({stops.reason or 'requested by another rank'})")


def resolve_resume_everywhere(cfg: TrainConfig, info: dist.DistInfo) -> ckpt.ResumePoint | None:
    """Rank 0 decides what to resume from, so that every rank loads the same tag
    even if a save lands on the file system while the others look. It runs before
    the engine exists because a universal checkpoint changes the DeepSpeed config;
    a refused checkpoint is raised on every rank, not left for the others to wait on."""
    decision: tuple[ckpt.ResumePoint | None, str | None] = (None, None)
    if info.is_main:
        try:
            decision = (ckpt.resolve_resume(cfg.checkpoint.resume, cfg.checkpoint_dir,
                                            cfg.checkpoint.trust_foreign), None)
        except (FileNotFoundError, OSError) as e:
            decision = (None, str(e))
    point, error = dist.broadcast_object(decision)
    if error is not None:
        raise FileNotFoundError(error)
    return point


class RunLocked(SystemExit):
    """Another live run holds output_dir (exit status 2)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def take_output_lock(cfg: TrainConfig, info: dist.DistInfo):
    """Rank 0 takes <output_dir>/run.lock (sharding/dir_lock.py); when another live
    run holds it, every rank raises RunLocked (exit status 2), rank 0 naming the holder."""
    from sharding.dir_lock import LOCK_FILE, OutputLocked, acquire

    lock, error = None, None
    if info.is_main and cfg.output_lock.enabled:
        os.makedirs(cfg.output_dir, exist_ok=True)
        try:
            lock = acquire(os.path.join(cfg.output_dir, LOCK_FILE), "training", refresh_s=cfg.output_lock.refresh_s,
                           stale_after_s=cfg.output_lock.stale_after_s)
        except OutputLocked as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error is not None:
        if info.is_main:
            log.error("%s", error)
        raise RunLocked(error)
    return lock


def train(cfg: TrainConfig) -> dict:
    """Run training on every rank; returns a summary (rank 0's is complete).

    Raises RunLocked (exit status 2) when another run holds output_dir, and
    Preempted (exit status 75) when it stopped on request with a checkpoint."""
    t_start, wall_start = time.monotonic(), time.time()
    # Before the process group exists, so that no thread of gloo/NCCL receives the stop signals.
    stops = start_stop_requests(cfg)
    lock = None
    try:
        info = dist.init_distributed(cfg.distributed_timeout_s)
        logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                            format=f"[rank{info.rank}] %(asctime)s %(name)s: %(message)s")
        # WARNING, so that every rank's log places it in the job (non-main ranks log
        # warnings only): node, host and pid per global rank.
        log.warning("%s", dist.rank_banner(info))
        if stops is not None:
            stops.rank = info.rank
        lock = take_output_lock(cfg, info)
        if info.is_main:
            for path in preemption.clear_previous(cfg.output_dir, wall_start):
                log.info("removed %s of the previous run", path)
        return _train(cfg, info, t_start, stops)
    finally:
        if lock is not None:
            lock.release()
        if stops is not None:
            stops.close()  # gives the caller its signal mask and handlers back


def start_stop_requests(cfg: TrainConfig) -> preemption.StopRequests | None:
    """This rank's stop requests (preemption.enabled), or None with the stop
    signals given back their default action."""
    if not cfg.preemption.enabled:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signal_numbers(STOP_SIGNALS))
        return None
    return preemption.StopRequests.from_config(cfg.preemption, rank=int(os.environ.get("RANK", "0"))).start()


def _train(cfg: TrainConfig, info: dist.DistInfo, t_start: float,
           stops: preemption.StopRequests | None = None) -> dict:
    from pipeline.data import batches_per_epoch, make_train_loader, stream_identity
    from modeling.image_processing import ImageProcessor

    resume = resolve_resume_everywhere(cfg, info)
    if stops is not None and cfg.preemption.stop_file:
        # After the broadcast above: rank 0 has removed an older STOP file by now.
        stops.watch_stop_file(os.path.join(cfg.output_dir, preemption.STOP_FILE))
    plan = plan_for(cfg, info.world_size)  # the CLI checked it already for the launcher's WORLD_SIZE
    ds_config = dist.resolve_deepspeed_config(cfg, info.world_size)
    if resume is not None and resume.universal:
        dist.enable_universal_load(ds_config)
    # Stored in the model config (before train_config.yaml is written), so the run's
    # files, checkpoints and export all carry the prefix trained on.
    cfg.model.cpm.answer_prefix = resolve_cpm_prefix(cfg, info)
    if info.is_main:
        write_run_files(cfg, ds_config)
    tokenizer = prepare_tokenizer(cfg, info)

    with dist.model_construction(ds_config):
        model = build_model(cfg, tokenizer)
    bpe = batches_per_epoch(cfg.data, info.world_size)
    total = total_optimizer_steps(cfg, bpe, plan.grad_accum)
    schedule = build_schedule(total, cfg.optim.warmup_ratio, cfg.optim.warmup_steps, cfg.optim.lr_schedule,
                              cfg.optim.min_lr_ratio)
    groups = dist.param_groups(model, cfg.optim.lr, cfg.optim.projector_lr or cfg.optim.lr,
                               cfg.optim.weight_decay)
    engine = dist.initialize_engine(model, ds_config, groups, schedule)

    local, whole = dist.partition_numels(engine.module)
    per_rank = dist.all_gather_objects(local)
    trainable_per_rank = dist.all_gather_objects(dist.partition_numels(engine.module, trainable_only=True)[0])
    param_bytes = torch.tensor([], dtype=torch_dtype(cfg.model.dtype)).element_size()

    def checkpoint_estimate() -> int:
        return space.estimate_checkpoint_bytes(per_rank, trainable_per_rank, param_bytes,
                                               measured=ckpt.newest_checkpoint_bytes(cfg.checkpoint_dir))
    identity = stream_identity(cfg.data, info.world_size)
    run_info = {"world_size": info.world_size, "backend": info.backend, "zero_stage": dist.zero_stage(ds_config),
                "params_total": whole, "params_per_rank": per_rank,
                "trainable_params": sum(dist.full_numel(p) for p in engine.module.parameters() if p.requires_grad),
                "batches_per_epoch": bpe, "total_steps": total, **plan.record(), "stream": identity}

    state = ckpt.TrainState(data_seed=cfg.data.seed, world_size=info.world_size)
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    if resume is not None:
        state = ckpt.restore_train_state(engine, resume.dir, resume.tag,
                                         verify=not (resume.universal or cfg.checkpoint.trust_foreign),
                                         rank=info.rank, world_size=info.world_size)
        note = resume_note((state.extra or {}).get("batch"), state.world_size, plan)
        if note is not None and info.is_main:
            (log.warning if note[0] else log.info)("%s", note[1])
        saved = (state.extra or {}).get("stream")
        if saved is not None and saved != identity and info.is_main:
            log.warning("resuming with a different data stream identity (world size, workers, batch size "
                        "or shards changed): the continuation is valid but not the uninterrupted stream")
        log.info("resumed from %s at step %d (epoch %d, batch %d)%s", os.path.join(resume.dir, resume.tag),
                 state.global_step, state.epoch, state.batch_in_epoch,
                 " (DeepSpeed universal checkpoint)" if resume.universal else "") if info.is_main else None
    state.extra = {"stream": identity, "batch": plan.record()}
    state.world_size = info.world_size
    if info.is_main:
        # Steps logged after the checkpoint by the run that died are trained again
        # now: drop them, so metrics.jsonl has one record per step. (W&B keeps the
        # first value of a step already: a resumed run cannot log below its step.)
        ckpt.drop_metrics_after(metrics_path, state.global_step)
        problem = space.space_problem(cfg.checkpoint_dir, checkpoint_estimate(), cfg.checkpoint.space_margin)
        if problem:
            log.warning("the next checkpoint save will be refused unless space is freed: %s", problem)

    from pipeline.tracking import start_train_tracking

    # run_info.json records the run's group for the evaluations of its export
    # (pipeline/evaluation/wandb_log.py).
    # The W&B service inherits the blocked stop signals: a SIGTERM to the process group
    # leaves it alive to record the stop's last step; rank 0's finish() ends it.
    tracker = start_train_tracking(cfg.wandb, cfg.wandb_dir, cfg.to_dict(), cfg.output_dir, is_main=info.is_main,
                                   run_id=state.wandb_run_id)
    state.wandb_run_id = dist.broadcast_object(tracker.run_id if info.is_main else None)
    if info.is_main:
        run_info.update(tracker.record())
        write_atomic(os.path.join(cfg.output_dir, "run_info.json"), json.dumps(run_info, indent=1))
        tracker.update_config({"run_info": {k: v for k, v in run_info.items() if k != "stream"}})
        log.info("ZeRO-%d over %d rank(s) (%s): %d parameters, %s on each rank; %d batches/epoch/rank, "
                 "%d optimizer steps; %s (accumulation from %s)", run_info["zero_stage"], info.world_size,
                 info.backend, whole, per_rank, bpe, total, plan.describe(), plan.source)

    image_processor = ImageProcessor(cfg.model, cfg.data.image_limits())
    config_dict = cfg.to_dict()

    def make_loader(epoch: int, start_batch: int):
        return make_train_loader(cfg.data, tokenizer, image_processor, rank=info.rank,
                                 world_size=info.world_size, epoch=epoch, start_batch=start_batch)

    def save(st: ckpt.TrainState) -> None:
        ckpt.save_checkpoint(engine, cfg.checkpoint_dir, st, config_dict, cfg.checkpoint.keep_last, info.is_main,
                             estimate=checkpoint_estimate() if info.is_main else None,
                             space_margin=cfg.checkpoint.space_margin)

    from modeling.costs.flops import step_flops
    from modeling.llm import causal_lm

    # The LLM's own row count (the tokenizer's length for a random-init one, the checkpoint's otherwise).
    flops = step_flops(cfg.model, vocab_size=causal_lm(model.llm).config.vocab_size)
    peak_flops, peak_source = device_peak_flops(cfg.perf.peak_tflops, cfg.perf.gpu, dist.device())
    if info.is_main:
        log.info("perf/mfu peak: %s; model FLOPs per sample %.3g + per LLM position %.3g + per position "
                 "pair %.3g (modeling.costs.flops)", peak_source, flops.per_sample, flops.per_token, flops.per_token_pair)

    progress = None
    if info.is_main:
        from tqdm import tqdm

        progress = tqdm(total=total, initial=state.global_step, desc="train", unit="step", dynamic_ncols=True)
    ctx = LoopContext(make_loader=make_loader, batches_per_epoch=bpe, total_steps=total, rank=info.rank,
                      world_size=info.world_size, seed=cfg.loop.seed, nonfinite=cfg.nonfinite,
                      dtype=torch_dtype(cfg.model.dtype), image_tokens=cfg.model.num_image_tokens,
                      log_every=cfg.loop.log_every, checkpoint_every=cfg.checkpoint.every_steps, save=save,
                      tracker=tracker, metrics_file=os.path.join(cfg.output_dir, "metrics.jsonl") if info.is_main
                      else None, progress=progress, stop_step=cfg.loop.stop_at_step,
                      cpm_watch=CpmWatch(enabled=cfg.model.cpm.enabled and cfg.model.cpm.weight > 0,
                                         prefix=cfg.model.cpm.resolved_prefix,
                                         abort_after_steps=cfg.cpm_check.abort_after_steps),
                      flops=flops, peak_flops=peak_flops,
                      stop_requested=(lambda: stops.requested) if stops is not None else (lambda: False))
    t_loop = time.monotonic()
    start_step = state.global_step
    exit_code = 1
    try:
        state = run_loop(engine, state, ctx)
        if progress is not None:
            progress.close()
        loop_s = time.monotonic() - t_loop
        if stops is not None and dist.any_rank(stops.requested):
            exit_code = preemption.EXIT_PREEMPTED
            stop_with_checkpoint(cfg, info, state, stops, save, tracker, total)
        final_tag = None
        if ckpt.needs_final_save(cfg.checkpoint_dir, state.global_step, cfg.checkpoint.save_final):
            save(state)
        if ckpt.is_complete(cfg.checkpoint_dir, ckpt.tag_for(state.global_step)):
            final_tag = ckpt.tag_for(state.global_step)
        export = None
        if cfg.checkpoint.export and state.global_step >= total:
            export = ckpt.export_final(engine.module, lambda: build_model(cfg, tokenizer, skip_init=True), tokenizer,
                                       os.path.join(cfg.output_dir, "export"), info.rank, card=cfg.to_dict())
        summary = {"global_step": state.global_step, "steps_this_run": state.global_step - start_step,
                   "loop_seconds": loop_s, "total_seconds": time.monotonic() - t_start,
                   "checkpoint_dir": cfg.checkpoint_dir, "final_checkpoint": final_tag, "export": export,
                   "wandb_run_dir": run_info.get("wandb_run_dir"), "samples_seen": state.samples_seen,
                   "skipped_batches": state.skipped_batches}
        if info.is_main:
            tracker.summary({"final/global_step": state.global_step, "final/loop_seconds": loop_s})
            write_atomic(os.path.join(cfg.output_dir, "train_summary.json"), json.dumps(summary, indent=1))
        exit_code = 0
        return summary
    finally:
        tracker.finish(exit_code=exit_code)
