"""The training loop, in small functions.

`run_loop` walks micro-batches across epochs; each goes through
`train_micro_batch` (forward, the finite-loss check agreed by all ranks,
backward, DeepSpeed step: DeepSpeed itself accumulates gradients and steps the
optimizer, the LambdaLR schedule and clipping at accumulation boundaries).
After every optimizer step `log_step` reports and `should_checkpoint` decides
on a save. Dropout is seeded from (seed, rank, step, micro-batch) at every
micro-batch, so a resumed run draws the same masks as an uninterrupted one
without any RNG state in the checkpoint.

Throughput metrics of a step (perf/*), besides samples and tokens per second:
- perf/model_tflops_per_s: model FLOPs of the step's real positions
  (modeling.costs.flops: forward and backward, no recomputation, padding excluded)
  per second and per rank; perf/mfu: that over the device's peak
  (`perf.peak_tflops` / the known-GPU table; not logged when no peak is known,
  e.g. on CPU, rather than logged as NaN).
- perf/padding_frac: padded LLM positions / all LLM positions of the step's
  batches (the image placeholder counted as the image tokens it becomes).
- perf/data_wait_frac: time spent waiting for the loader to yield the step's
  micro-batches (from the end of the previous micro-step, or from opening the
  loader), summed over the micro-batches, averaged over ranks (the all-reduce
  is a sum) and divided by the step time.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from modeling.costs.flops import PEAK_TFLOPS, StepFlops
from modeling.costs.flops import peak_tflops as peak_tflops_for
from pipeline import distributed as dist
from pipeline.data.plan import seeded_rng
from pipeline.training.checkpointing import TrainState

log = logging.getLogger(__name__)

MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask", "labels", "forgery_labels")


@dataclass
class MicroStats:
    """Statistics of one micro-batch on one rank, or their sum over ranks and
    micro-batches: every field is a sum. They cross ranks as one float64 tensor
    (fields in declaration order), so a single all-reduce carries all of them,
    the non-finite flag included."""

    loss: float = 0.0
    """The micro-batch's loss (0 when it is not finite: a NaN would poison the sum of every rank)."""
    lm_loss: float = 0.0
    """Its language-model part (0 when the loss is not finite)."""
    cpm_loss: float = 0.0
    """Its CPM part (0 when the loss is not finite)."""
    cpm_correct: float = 0.0
    """Samples whose CPM decision was right."""
    cpm_found: float = 0.0
    """Samples whose answer has a CPM position."""
    samples: float = 0.0
    """Samples of the micro-batch."""
    tokens: float = 0.0
    """Real LLM positions, the sum of L_i (text tokens plus the image tokens of the placeholder)."""
    tokens_sq: float = 0.0
    """Sum of L_i^2 (the attention FLOPs)."""
    positions: float = 0.0
    """LLM positions including the padding."""
    bad_samples: float = 0.0
    """Samples the loader dropped while building the batch."""
    nonfinite: float = 0.0
    """Ranks whose loss was not finite (0 or 1 on one rank)."""
    data_wait_s: float = 0.0
    """Seconds spent waiting for the loader to yield the batch."""
    stop_requested: float = 0.0
    """Ranks with a stop request (pipeline/training/preemption.py): carried by the
    same all-reduce, so every rank leaves the loop after the same optimizer step."""

    def to_tensor(self, device: torch.device | None = None) -> torch.Tensor:
        """The fields as one tensor; `device`: where the collective wants it (NCCL: the GPU)."""
        return torch.tensor(dataclasses.astuple(self), dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "MicroStats":
        return cls(*t.tolist())

    def __add__(self, other: "MicroStats") -> "MicroStats":
        return MicroStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


class NonFiniteLossError(RuntimeError):
    """A non-finite loss with nonfinite: stop."""


class CpmNotFoundError(RuntimeError):
    """The CPM found its position in no sample of the run's first steps."""


@dataclass
class CpmWatch:
    """Watches that the CPM finds its position: a silent zero CPM loss is the
    failure mode of a conclusion spelled differently from what the model expects."""

    enabled: bool
    """The CPM loss is on (nothing is watched otherwise)."""
    prefix: str
    """The conclusion text expected before the decision word (named in the messages)."""
    abort_after_steps: int = 10
    """Stop when the run's first this many steps found no position at all (0: never)."""
    steps: int = 0
    found_any: bool = False

    def after_step(self, acc: "StepAccumulator", step: int, rank: int) -> None:
        """Called on every rank after each optimizer step (the sums are global, so
        all ranks agree on whether to gather the keys and whether to stop)."""
        if not self.enabled:
            return
        self.steps += 1
        if acc.sums.cpm_found > 0:
            self.found_any = True
            return
        keys = dist.all_gather_objects(list(acc.keys))
        expected = f"{self.prefix!r} followed by real/fake"
        if rank == 0:
            log.warning("step %d: no sample of the batch has a CPM position (%s, in any whitespace), so its CPM "
                        "loss is 0; sample keys per rank: %s", step, expected, keys)
        if self.abort_after_steps and not self.found_any and self.steps >= self.abort_after_steps:
            raise CpmNotFoundError(
                f"the first {self.steps} optimizer steps of this run found no CPM position in any sample: no "
                f"supervised answer contains {expected} (model.cpm.answer_prefix). The CPM loss has been 0 "
                f"throughout. Check the conclusion text of the training answers, set model.cpm.answer_prefix "
                f"to what precedes the real/fake word, or disable the check with cpm_check.abort_after_steps=0")


@dataclass
class StepAccumulator:
    """Global sums over the micro-batches of one optimizer step."""

    sums: MicroStats = field(default_factory=MicroStats)
    micro: int = 0
    keys: list = field(default_factory=list)
    """This rank's sample keys of the step (named when the step has no CPM position)."""
    started: float = field(default_factory=time.perf_counter)
    lrs: list[float] = field(default_factory=list)
    """Learning rates the step's update used (read before the scheduler advances)."""

    def add(self, stats: MicroStats, keys=()) -> None:
        self.sums = self.sums + stats
        self.micro += 1
        self.keys.extend(keys)


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """Seed of the dropout masks of one micro-batch: a function of (seed, rank,
    optimizer step, micro-batch index) only, so a resumed run draws the masks of
    an uninterrupted one.

    It is the XOR of two stable hashes made the way the data plan makes its
    seeds (pipeline.data.plan.seeded_rng): one of the rank, one of the position
    (step, micro). Two positions then share a seed only by a 63-bit hash
    coincidence (about n^2 / 2^64 among n seeds), never by arithmetic, as a
    linear mix of constants did. The split also lets a test check the seeds of
    every rank at every step at once (rank_seed_part x position_seed_part).
    """
    return rank_seed_part(seed, rank) ^ position_seed_part(seed, step, micro)


def rank_seed_part(seed: int, rank: int) -> int:
    """The rank's half of step_seed (63 bits)."""
    return seeded_rng("dropout-rank", seed, rank).getrandbits(63)


def position_seed_part(seed: int, step: int, micro: int) -> int:
    """The (step, micro-batch) half of step_seed (63 bits), shared by all ranks."""
    return seeded_rng("dropout-position", seed, step, micro).getrandbits(63)


def model_inputs(batch: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    missing = [k for k in MODEL_INPUTS if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing} (keys: {sorted(batch)})")
    out = {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS}
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def _output_sum(out: Any, name: str) -> float:
    """Sum of the model output's field `name` (0 when the model does not return it)."""
    v = getattr(out, name, None)
    return 0.0 if v is None else float(v.detach().double().sum())


def micro_stats(out: Any, batch: dict, image_tokens: int, data_wait_s: float = 0.0,
                stop_requested: bool = False) -> MicroStats:
    """This rank's statistics of one micro-batch (all-reduced by the caller);
    data_wait_s: how long this rank waited for the loader to yield it;
    stop_requested: whether this rank has a stop request."""
    loss = out.loss.detach().float()
    finite = bool(torch.isfinite(loss))
    n, width = batch["input_ids"].shape
    # LLM positions: text tokens plus the image tokens that replace the placeholder.
    lengths = batch["attention_mask"].sum(dim=1).double() + (image_tokens - 1)
    # Non-finite values would poison the sums of every rank; the flag carries the news.
    return MicroStats(loss=loss.item() if finite else 0.0,
                      lm_loss=_output_sum(out, "lm_loss") if finite else 0.0,
                      cpm_loss=_output_sum(out, "cpm_loss") if finite else 0.0,
                      cpm_correct=_output_sum(out, "cpm_correct"), cpm_found=_output_sum(out, "cpm_found"),
                      samples=float(n), tokens=float(lengths.sum()), tokens_sq=float((lengths * lengths).sum()),
                      positions=float(n * (width + image_tokens - 1)),
                      bad_samples=float(batch.get("bad_samples", 0) or 0), nonfinite=0.0 if finite else 1.0,
                      data_wait_s=data_wait_s, stop_requested=1.0 if stop_requested else 0.0)


def train_micro_batch(engine, batch: dict, state: TrainState, acc: StepAccumulator, *, rank: int,
                      seed: int, policy: str, dtype: torch.dtype, image_tokens: int,
                      data_wait_s: float = 0.0, stop_requested: bool = False) -> bool:
    """One micro-batch. Returns True when it completed an optimizer step.

    The finite check is agreed on by all ranks (one all-reduce that also
    carries the logging statistics), so every rank stops or skips together and
    no rank is left waiting in a collective.
    """
    torch.manual_seed(step_seed(seed, rank, state.global_step, acc.micro))
    out = engine(**model_inputs(batch, dist.device(), dtype))
    mine = micro_stats(out, batch, image_tokens, data_wait_s, stop_requested)
    stats = MicroStats.from_tensor(dist.all_reduce_sum(mine.to_tensor(dist.device())))
    if stats.nonfinite > 0:
        keys = dist.all_gather_objects(list(batch.get("keys", [])))
        where = (f"non-finite loss at optimizer step {state.global_step + 1} (micro-batch {acc.micro}, "
                 f"epoch {state.epoch}, batch {state.batch_in_epoch - 1} of the epoch) on "
                 f"{int(stats.nonfinite)} rank(s); batch keys per rank: {keys}")
        if policy == "stop":
            raise NonFiniteLossError(where)
        log.warning("skipping micro-batch: %s", where)
        state.skipped_batches += 1
        del out
        return False
    boundary = engine.is_gradient_accumulation_boundary()
    if boundary:
        acc.lrs = dist.current_lrs(engine)
    engine.backward(out.loss)
    engine.step()
    acc.add(stats, batch.get("keys", ()))
    state.samples_seen += int(stats.samples)
    return boundary


def should_checkpoint(step: int, every: int, total: int) -> bool:
    """Every `every` steps (never twice at the end: the final save covers it)."""
    return every > 0 and step % every == 0 and step < total


def step_metrics(engine, acc: StepAccumulator, state: TrainState, batches_per_epoch: int,
                 world_size: int, flops: StepFlops | None = None,
                 peak_flops: float | None = None) -> dict[str, float]:
    """The step's metrics. flops: the model's FLOPs coefficients (perf/model_tflops_per_s
    and, with peak_flops, the FLOP/s of one device, perf/mfu)."""
    s = acc.sums
    elapsed = max(time.perf_counter() - acc.started, 1e-9)
    ranks_micro = max(acc.micro * world_size, 1)
    lrs = acc.lrs or dist.current_lrs(engine)
    m = {
        "train/loss": s.loss / ranks_micro,
        "train/lm_loss": s.lm_loss / ranks_micro,
        "train/cpm_loss": s.cpm_loss / ranks_micro,
        "train/cpm_acc": s.cpm_correct / max(s.samples, 1),
        # Share of samples whose answer has a CPM position (the rest add no CPM loss).
        "train/cpm_found_frac": s.cpm_found / max(s.samples, 1),
        "train/lr": lrs[0],
        "train/epoch": state.epoch + state.batch_in_epoch / max(batches_per_epoch, 1),
        "train/samples_seen": float(state.samples_seen),
        "train/bad_samples": s.bad_samples,
        "train/skipped_batches": float(state.skipped_batches),
        "perf/samples_per_s": s.samples / elapsed,
        "perf/tokens_per_s": s.tokens / elapsed,
        "perf/step_time_s": elapsed,
        "perf/padding_frac": 1.0 - s.tokens / max(s.positions, 1.0),
        "perf/data_wait_frac": s.data_wait_s / world_size / elapsed,
    }
    if flops is not None:
        per_rank = flops.train_flops(s.samples, s.tokens, s.tokens_sq) / world_size / elapsed
        m["perf/model_tflops_per_s"] = per_rank / 1e12
        if peak_flops:
            m["perf/mfu"] = per_rank / peak_flops
    if len(lrs) > 1:
        m["train/lr_max_group"] = max(lrs)
    gn = dist.global_grad_norm(engine)
    if gn is not None:
        m["train/grad_norm"] = gn
    m.update(memory_metrics())
    return m


def memory_metrics() -> dict[str, float]:
    out = {}
    try:
        import psutil

        out["memory/rss_gb"] = psutil.Process().memory_info().rss / 2**30
    except Exception:  # noqa: BLE001 - metrics must not fail training
        pass
    out["memory/peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if torch.cuda.is_available():
        out["memory/gpu_allocated_gb"] = torch.cuda.memory_allocated() / 2**30
        out["memory/gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def log_step(metrics: dict[str, float], step: int, tracker, metrics_file: str | None, progress) -> None:
    """Rank 0: W&B, the metrics.jsonl next to the run, and the progress bar."""
    tracker.log(metrics, step=step)
    if metrics_file is not None:
        with open(metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
    if progress is not None:
        # Postfix first: update() redraws, so the bar shows this step's figures.
        progress.set_postfix_str(progress_line(metrics), refresh=False)
        progress.update(1)


def progress_line(metrics: dict[str, float]) -> str:
    """The tqdm postfix: loss, CPM accuracy, lr, throughput, MFU (when known), padding, loader wait."""
    mfu = f" mfu {metrics['perf/mfu']:.1%}" if "perf/mfu" in metrics else ""
    return (f"loss {metrics['train/loss']:.3f} cpm_acc {metrics['train/cpm_acc']:.2f} "
            f"lr {metrics['train/lr']:.2e} {metrics['perf/samples_per_s']:.1f} samples/s{mfu} "
            f"pad {metrics.get('perf/padding_frac', 0.0):.0%} wait {metrics.get('perf/data_wait_frac', 0.0):.0%}")


@dataclass
class LoopContext:
    """What the loop needs besides the engine and the state."""

    make_loader: Callable[[int, int], Any]
    """(epoch, start_batch) -> an iterable of this rank's batches."""
    batches_per_epoch: int
    total_steps: int
    rank: int
    world_size: int
    seed: int
    nonfinite: str
    dtype: torch.dtype
    image_tokens: int
    log_every: int
    checkpoint_every: int
    save: Callable[[TrainState], None]
    tracker: Any
    metrics_file: str | None
    progress: Any = None
    stop_step: int | None = None
    """Leave the loop at this step (<= total_steps) without changing the schedule."""
    cpm_watch: CpmWatch | None = None
    """Per-step check that the CPM finds its position (None: no check)."""
    flops: StepFlops | None = None
    """The model's training FLOPs (modeling.costs.flops.step_flops); None: no FLOPs metrics."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device (device_peak_flops); None: perf/mfu is not logged."""
    stop_requested: Callable[[], bool] = lambda: False
    """This rank's stop request (preemption.StopRequests.requested), read at every
    micro-batch; the loop ends after the first optimizer step in which any rank had one."""

    @property
    def end_step(self) -> int:
        return min(self.total_steps, self.stop_step or self.total_steps)


def run_loop(engine, state: TrainState, ctx: LoopContext) -> TrainState:
    """Train until state.global_step reaches ctx.end_step, or until the end of
    the optimizer step in which some rank requested a stop (all ranks see the
    same summed request, so they all leave after that step)."""
    engine.train()
    acc = StepAccumulator()
    stopping = False
    while state.global_step < ctx.end_step and not stopping:
        if state.batch_in_epoch >= ctx.batches_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        opened = time.perf_counter()
        for wait, batch in timed(ctx.make_loader(state.epoch, state.batch_in_epoch), opened):
            state.batch_in_epoch += 1
            stepped = train_micro_batch(engine, batch, state, acc, rank=ctx.rank, seed=ctx.seed,
                                        policy=ctx.nonfinite, dtype=ctx.dtype,
                                        image_tokens=ctx.image_tokens, data_wait_s=wait,
                                        stop_requested=ctx.stop_requested())
            if not stepped:
                continue
            state.global_step += 1
            if ctx.cpm_watch is not None:
                ctx.cpm_watch.after_step(acc, state.global_step, ctx.rank)
            if state.global_step % ctx.log_every == 0 or state.global_step == ctx.total_steps:
                metrics = step_metrics(engine, acc, state, ctx.batches_per_epoch, ctx.world_size,
                                       flops=ctx.flops, peak_flops=ctx.peak_flops)
                if ctx.rank == 0:
                    log_step(metrics, state.global_step, ctx.tracker, ctx.metrics_file, ctx.progress)
                    check_metrics(metrics, state.global_step)
            elif ctx.progress is not None:
                ctx.progress.update(1)
            # Summed over ranks and micro-batches: > 0 when any rank had a request in this step.
            stopping = acc.sums.stop_requested > 0
            acc = StepAccumulator()
            if should_checkpoint(state.global_step, ctx.checkpoint_every, ctx.end_step):
                ctx.save(state)
            if stopping and ctx.rank == 0:
                log.warning("leaving the training loop after step %d: a stop was requested", state.global_step)
            if stopping or state.global_step >= ctx.end_step:
                break
        else:
            # The epoch's batches are exhausted; the next pass of the while opens the next epoch.
            state.batch_in_epoch = ctx.batches_per_epoch
    return state


def timed(batches, started: float):
    """(seconds the loader took to yield it, batch) for each batch; the first wait
    counts from `started` (opening the loader: worker start-up and its first batch)."""
    t = started
    for batch in batches:
        yield time.perf_counter() - t, batch
        t = time.perf_counter()  # resumed: the micro-step that used the batch is done


def device_peak_flops(peak_tflops: float | None, gpu: str, device: torch.device | None = None
                      ) -> tuple[float | None, str]:
    """(peak FLOP/s of one device or None, how it was decided) from the perf config:
    an explicit peak_tflops, a named table entry, or ("auto") the CUDA device's name."""
    if peak_tflops is not None:
        return peak_tflops * 1e12, f"perf.peak_tflops={peak_tflops:g}"
    if gpu != "auto":
        return PEAK_TFLOPS[gpu] * 1e12, f"perf.gpu={gpu}: {PEAK_TFLOPS[gpu]:g} TFLOP/s"
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None, "no CUDA device: perf/mfu is not logged (set perf.peak_tflops to log it)"
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops_for(name)
    if peak is None:
        return None, f"{name!r} is not in modeling.costs.flops.PEAK_TFLOPS: perf/mfu is not logged (set perf.peak_tflops)"
    return peak * 1e12, f"{name}: {peak:g} TFLOP/s dense bf16/fp16 (modeling.costs.flops.PEAK_TFLOPS)"


def check_metrics(metrics: dict[str, float], step: int) -> None:
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        log.warning("step %d: non-finite metrics %s", step, bad)
