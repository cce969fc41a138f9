"""One training run, start to end, on every rank.

`train(cfg)` is what `launch/train.py` hands off to: it takes this rank's stop
requests, the process group and the output lock, then `_train` runs the steps
of the run in order:

  resolve_resume_everywhere  the checkpoint every rank loads (resume.py)
  build_run                  tokenizer, model under ZeRO, engine (build.py)
  restore_state              the TrainState, loaded or fresh
  start_tracking             W&B and run_info.json
  loop_context, run_loop     the loop (loop.py)
  stop_with_checkpoint       on a stop request: a checkpoint, PREEMPTED, exit status 75
  finish                     the final checkpoint, the export, train_summary.json
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time

from common.atomic_files import write_atomic
from modeling.costs.flops import StepFlops
from modeling.vision import torch_dtype
from pipeline import distributed as dist
from pipeline.process_signals import STOP_SIGNALS, signal_numbers
from pipeline.tracking import Tracker, start_train_tracking
from pipeline.training import checkpoint_space as space
from pipeline.training import preemption
from pipeline.training.batch import resume_note
from pipeline.training.build import Run, build_model, build_run
from pipeline.training.checkpoint_tags import is_complete, tag_for
from pipeline.training.checkpointing import TrainState, drop_metrics_after, needs_final_save, restore_train_state
from pipeline.training.config import TrainConfig
from pipeline.training.export import export_final
from pipeline.training.loop import CpmWatch, LoopContext, device_peak_flops, run_loop
from pipeline.training.resume import ResumePoint, resolve_resume

log = logging.getLogger("pipeline.training")


# --------------------------------------------------------------------------- the process

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
    """Every rank, inside the process group and the lock: build the run, restore its
    state, loop, then stop or finish; the tracker ends with the run's exit status."""
    resume = resolve_resume_everywhere(cfg, info)
    if stops is not None and cfg.preemption.stop_file:
        # After the broadcast above: rank 0 has removed an older STOP file by now.
        stops.watch_stop_file(os.path.join(cfg.output_dir, preemption.STOP_FILE))
    run = build_run(cfg, info, resume)
    state = restore_state(run, resume)
    tracker, run_info = start_tracking(run, state)
    ctx = loop_context(run, state, tracker, stops)
    t_loop = time.monotonic()
    start_step = state.global_step
    exit_code = 1
    try:
        state = run_loop(run.engine, state, ctx)
        if ctx.progress is not None:
            ctx.progress.close()
        loop_s = time.monotonic() - t_loop
        if stops is not None and dist.any_rank(stops.requested):
            exit_code = preemption.EXIT_PREEMPTED
            stop_with_checkpoint(cfg, info, state, stops, run.save, tracker, run.total_steps)
        summary = finish(run, state, tracker, start_step=start_step, loop_s=loop_s, t_start=t_start,
                         wandb_run_dir=run_info.get("wandb_run_dir"))
        exit_code = 0
        return summary
    finally:
        tracker.finish(exit_code=exit_code)


# --------------------------------------------------------------------------- restore

def resolve_resume_everywhere(cfg: TrainConfig, info: dist.DistInfo) -> ResumePoint | None:
    """Rank 0 decides what to resume from, so that every rank loads the same tag
    even if a save lands on the file system while the others look. It runs before
    the engine exists because a universal checkpoint changes the DeepSpeed config;
    a refused checkpoint is raised on every rank, not left for the others to wait on."""
    decision: tuple[ResumePoint | None, str | None] = (None, None)
    if info.is_main:
        try:
            decision = (resolve_resume(cfg.checkpoint.resume, cfg.checkpoint_dir,
                                       cfg.checkpoint.trust_foreign), None)
        except (FileNotFoundError, OSError) as e:
            decision = (None, str(e))
    point, error = dist.broadcast_object(decision)
    if error is not None:
        raise FileNotFoundError(error)
    return point


def restore_state(run: Run, resume: ResumePoint | None) -> TrainState:
    """Every rank: the training state, from `resume` (with the engine's weights and
    optimizer) or fresh, stamped with this run's stream and batch; then rank 0's
    `prepare_outputs`."""
    cfg, info = run.cfg, run.info
    state = TrainState(data_seed=cfg.data.seed, world_size=info.world_size)
    if resume is not None:
        state = restore_train_state(run.engine, resume.dir, resume.tag,
                                    verify=not (resume.universal or cfg.checkpoint.trust_foreign),
                                    rank=info.rank, world_size=info.world_size)
        if info.is_main:
            report_resume(run, resume, state)
    state.extra = {"stream": run.stream, "batch": run.plan.record()}
    state.world_size = info.world_size
    if info.is_main:
        prepare_outputs(run, state)
    return state


def report_resume(run: Run, resume: ResumePoint, state: TrainState) -> None:
    """Rank 0: what changed since the checkpoint (batch, data stream), and where the run resumed."""
    note = resume_note((state.extra or {}).get("batch"), state.world_size, run.plan)
    if note is not None:
        (log.warning if note[0] else log.info)("%s", note[1])
    saved = (state.extra or {}).get("stream")
    if saved is not None and saved != run.stream:
        log.warning("resuming with a different data stream identity (world size, workers, batch size "
                    "or shards changed): the continuation is valid but not the uninterrupted stream")
    log.info("resumed from %s at step %d (epoch %d, batch %d)%s", os.path.join(resume.dir, resume.tag),
             state.global_step, state.epoch, state.batch_in_epoch,
             " (DeepSpeed universal checkpoint)" if resume.universal else "")


def prepare_outputs(run: Run, state: TrainState) -> None:
    """Rank 0: metrics.jsonl cut back to the restored step, and a warning when the
    next checkpoint will not fit."""
    cfg = run.cfg
    # Steps logged after the checkpoint by the run that died are trained again
    # now: drop them, so metrics.jsonl has one record per step. (W&B keeps the
    # first value of a step already: a resumed run cannot log below its step.)
    drop_metrics_after(os.path.join(cfg.output_dir, "metrics.jsonl"), state.global_step)
    problem = space.space_problem(cfg.checkpoint_dir, run.checkpoint_estimate(), cfg.checkpoint.space_margin)
    if problem:
        log.warning("the next checkpoint save will be refused unless space is freed: %s", problem)


# --------------------------------------------------------------------------- tracking and the loop

def start_tracking(run: Run, state: TrainState) -> tuple[Tracker, dict]:
    """Every rank: the W&B tracker (rank 0's is live; a resumed run continues its W&B
    run) and its id in `state`; rank 0 writes run_info.json. Returns (tracker, run_info)."""
    cfg, info = run.cfg, run.info
    # run_info.json records the run's group for the evaluations of its export
    # (pipeline/evaluation/wandb_log.py).
    # The W&B service inherits the blocked stop signals: a SIGTERM to the process group
    # leaves it alive to record the stop's last step; rank 0's finish() ends it.
    tracker = start_train_tracking(cfg.wandb, cfg.wandb_dir, cfg.to_dict(), cfg.output_dir, is_main=info.is_main,
                                   run_id=state.wandb_run_id)
    state.wandb_run_id = dist.broadcast_object(tracker.run_id if info.is_main else None)
    run_info = run.record()
    if info.is_main:
        run_info.update(tracker.record())
        write_atomic(os.path.join(cfg.output_dir, "run_info.json"), json.dumps(run_info, indent=1))
        tracker.update_config({"run_info": {k: v for k, v in run_info.items() if k != "stream"}})
        log.info("ZeRO-%d over %d rank(s) (%s): %d parameters, %s on each rank; %d batches/epoch/rank, "
                 "%d optimizer steps; %s (accumulation from %s)", run_info["zero_stage"], info.world_size,
                 info.backend, run.params.total, run.params.per_rank, run.batches_per_epoch, run.total_steps,
                 run.plan.describe(), run.plan.source)
    return tracker, run_info


def loop_context(run: Run, state: TrainState, tracker: Tracker, stops: preemption.StopRequests | None) -> LoopContext:
    """What run_loop needs besides the engine and the state: this rank's loader, the
    save, the FLOPs, rank 0's metrics file and progress bar, and the stop requests."""
    cfg, info = run.cfg, run.info
    make_loader = loader_factory(run)
    flops, peak_flops = model_flops(run)
    progress = progress_bar(run.total_steps, state.global_step) if info.is_main else None
    return LoopContext(make_loader=make_loader, batches_per_epoch=run.batches_per_epoch,
                       total_steps=run.total_steps, rank=info.rank, world_size=info.world_size,
                       seed=cfg.loop.seed, nonfinite=cfg.nonfinite, dtype=torch_dtype(cfg.model.dtype),
                       image_tokens=cfg.model.num_image_tokens, log_every=cfg.loop.log_every,
                       checkpoint_every=cfg.checkpoint.every_steps, save=run.save, tracker=tracker,
                       metrics_file=os.path.join(cfg.output_dir, "metrics.jsonl") if info.is_main else None,
                       progress=progress, stop_step=cfg.loop.stop_at_step,
                       cpm_watch=CpmWatch(enabled=cfg.model.cpm.enabled and cfg.model.cpm.weight > 0,
                                          prefix=cfg.model.cpm.resolved_prefix,
                                          abort_after_steps=cfg.cpm_check.abort_after_steps),
                       flops=flops, peak_flops=peak_flops,
                       stop_requested=(lambda: stops.requested) if stops is not None else (lambda: False))


def loader_factory(run: Run):
    """(epoch, start_batch) -> this rank's training batches of that epoch from that batch on."""
    from modeling.image_processing import ImageProcessor
    from pipeline.data import make_train_loader

    cfg, info = run.cfg, run.info
    image_processor = ImageProcessor(cfg.model, cfg.data.image_limits())

    def make_loader(epoch: int, start_batch: int):
        return make_train_loader(cfg.data, run.tokenizer, image_processor, rank=info.rank,
                                 world_size=info.world_size, epoch=epoch, start_batch=start_batch)
    return make_loader


def model_flops(run: Run) -> tuple[StepFlops, float | None]:
    """The model's training FLOPs and the device's peak FLOP/s (perf/mfu), logged by rank 0."""
    from modeling.costs.flops import step_flops
    from modeling.llm import causal_lm

    cfg = run.cfg
    # The LLM's own row count (the tokenizer's length for a random-init one, the checkpoint's otherwise).
    flops = step_flops(cfg.model, vocab_size=causal_lm(run.model.llm).config.vocab_size)
    peak_flops, peak_source = device_peak_flops(cfg.perf.peak_tflops, cfg.perf.gpu, dist.device())
    if run.info.is_main:
        log.info("perf/mfu peak: %s; model FLOPs per sample %.3g + per LLM position %.3g + per position "
                 "pair %.3g (modeling.costs.flops)", peak_source, flops.per_sample, flops.per_token, flops.per_token_pair)
    return flops, peak_flops


def progress_bar(total: int, initial: int):
    """Rank 0's progress bar over the run's optimizer steps."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


# --------------------------------------------------------------------------- the end

def stop_with_checkpoint(cfg: TrainConfig, info: dist.DistInfo, state: TrainState,
                         stops: preemption.StopRequests, save, tracker, total: int) -> None:
    """Every rank, after the loop left on a stop request: a complete checkpoint of
    this step (unless the loop just wrote one), rank 0's PREEMPTED marker, then
    Preempted (exit status 75). The export is left to the resumed run."""
    tag = tag_for(state.global_step)
    if not is_complete(cfg.checkpoint_dir, tag):
        save(state)
    reasons = dist.all_gather_objects(stops.reason)
    path = os.path.join(cfg.checkpoint_dir, tag)
    if info.is_main:
        requested = {r: why for r, why in enumerate(reasons) if why}
        marker = preemption.write_marker(cfg.output_dir, {
            "step": state.global_step, "total_steps": total, "checkpoint": path,
            "complete": is_complete(cfg.checkpoint_dir, tag), "samples_seen": state.samples_seen,
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


def finish(run: Run, state: TrainState, tracker: Tracker, *, start_step: int, loop_s: float, t_start: float,
           wandb_run_dir: str | None) -> dict:
    """Every rank after the loop ran to its end: the final checkpoint, the export
    (once the run reached its last step) and the summary, which rank 0 also gives
    W&B and writes to train_summary.json."""
    cfg = run.cfg
    final_tag = save_final(run, state)
    export = None
    if cfg.checkpoint.export and state.global_step >= run.total_steps:
        export = export_final(run.engine.module, lambda: build_model(cfg, run.tokenizer, skip_init=True),
                              run.tokenizer, os.path.join(cfg.output_dir, "export"), run.info.rank,
                              card=cfg.to_dict())
    summary = {"global_step": state.global_step, "steps_this_run": state.global_step - start_step,
               "loop_seconds": loop_s, "total_seconds": time.monotonic() - t_start,
               "checkpoint_dir": cfg.checkpoint_dir, "final_checkpoint": final_tag, "export": export,
               "wandb_run_dir": wandb_run_dir, "samples_seen": state.samples_seen,
               "skipped_batches": state.skipped_batches}
    if run.info.is_main:
        tracker.summary({"final/global_step": state.global_step, "final/loop_seconds": loop_s})
        write_atomic(os.path.join(cfg.output_dir, "train_summary.json"), json.dumps(summary, indent=1))
    return summary


def save_final(run: Run, state: TrainState) -> str | None:
    """Every rank: the final checkpoint unless this step's is complete already; the
    tag of this step's complete checkpoint, or None."""
    if needs_final_save(run.cfg.checkpoint_dir, state.global_step, run.cfg.checkpoint.save_final):
        run.save(state)
    if is_complete(run.cfg.checkpoint_dir, tag_for(state.global_step)):
        return tag_for(state.global_step)
    return None
