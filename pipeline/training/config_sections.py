"""The sections of the training configuration (one typed dataclass each, a docstring
per field); assembled into TrainConfig by pipeline.training.config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.config_loading import ConfigError
from modeling.costs.flops import PEAK_TFLOPS
from pipeline.process_signals import STOP_SIGNALS

# The old name of the one configuration error class (common.config_loading).
TrainConfigError = ConfigError

# perf.gpu: "auto" or a key of the peak table.
GpuName = Literal[("auto", *PEAK_TFLOPS)]


@dataclass
class TokenizerConfig:
    """Where the tokenizer comes from."""

    path: str | None = None
    """A transformers tokenizer directory (the LLM's own for the paper recipe).
    None builds a small byte-level BPE tokenizer from the conversations of the
    training shards (tiny preset), saved under `<output_dir>/tokenizer`."""
    vocab_size: int = 1024
    """Vocabulary bound of the built tokenizer (ignored when `path` is set)."""
    corpus_samples: int = 2000
    """Training samples read from the shards to build the tokenizer."""


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 2e-5
    """Peak learning rate of the LLM's LoRA adapters (and of everything that is
    not a projector)."""
    projector_lr: float | None = None
    """Peak learning rate of the two projectors and the fusion module; None
    uses `lr` (the paper uses the same 2e-5)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to biases and norms)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.03
    """Share of the total optimizer steps spent in linear warm-up from 0."""
    warmup_steps: int | None = None
    """Warm-up length in steps; overrides warmup_ratio when set."""
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """Decay after warm-up: cosine down to min_lr_ratio x lr, or constant."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine decay as a fraction of the peak learning rate."""


@dataclass
class LoopConfig:
    """How long to train and how a step is made. The micro-batch size per rank
    is `data.batch_size` (the loader owns it)."""

    epochs: float | None = 3.0
    """Passes over the training shards (fractions allowed); ignored when max_steps is set."""
    max_steps: int | None = None
    """Optimizer steps to run; when set it decides the length (and the cosine horizon)."""
    stop_at_step: int | None = None
    """End this run (with a checkpoint, without the export) once global_step
    reaches this, keeping the schedule's horizon: a time slice of a longer job
    on a preemptible queue, continued later with checkpoint.resume=auto."""
    grad_accum: int | None = None
    """Micro-batches accumulated per optimizer step; null: derived from
    global_batch, or 1 when global_batch is null too. Setting both is an error
    unless they agree on the run's world size."""
    global_batch: int | None = None
    """Samples per optimizer step over all ranks (the paper's 128), instead of
    grad_accum: the accumulation is derived at start as global_batch /
    (data.batch_size x ranks), so the recipe keeps its global batch on any
    number of GPUs and across a resume on another world size
    (pipeline/training/batch.py). One that does not divide stops the run before
    anything starts, naming the nearest valid choices."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold; 0 disables clipping."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (LLM layers) to save memory."""
    log_every: int = 1
    """Log metrics every this many optimizer steps."""
    seed: int = 42
    """Seed of model initialisation and of per-step dropout (resume-invariant)."""


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO settings (the generated DeepSpeed JSON)."""

    stage: Literal[0, 1, 2, 3] = 3
    """ZeRO stage 0-3: 3 partitions parameters, gradients and optimizer states."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep optimizer states (and the step) on the CPU."""
    offload_param: Literal["none", "cpu"] = "none"
    """Keep partitioned parameters on the CPU (stage 3 only)."""
    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient reduce bucket."""
    stage3_prefetch_bucket_size: int = 50_000_000
    """Elements of parameters prefetched ahead of use (stage 3)."""
    stage3_param_persistence_threshold: int = 100_000
    """Parameters smaller than this many elements stay unpartitioned (stage 3);
    set 0 to partition everything."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON of your own, used instead of the generated one (batch
    sizes, clipping and precision are still checked against this config)."""


@dataclass
class CheckpointConfig:
    """Checkpoints, resume and the final export."""

    dir: str | None = None
    """Checkpoint folder; None: `<output_dir>/checkpoints`."""
    every_steps: int = 500
    """Save every this many optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """Complete checkpoints kept (older ones are deleted after a newer one completes)."""
    resume: str | None = None
    """"auto": continue from the newest complete checkpoint in `dir` if there
    is one; a path: that checkpoint tag folder; None: start fresh."""
    save_final: bool = True
    """Save a DeepSpeed checkpoint after the last step."""
    space_margin: float = 1.2
    """Before each save the checkpoint's size is estimated (pipeline/training/
    checkpoint_space.py: estimate_checkpoint_bytes) and a save whose estimate times
    this factor exceeds the free space of the checkpoint folder's file system is
    refused naming the numbers; at start-up a first save that would not fit is
    warned about. 0 disables both checks."""
    export: bool = True
    """After the last step write the LoRA adapter + trainables and the merged model."""
    trust_foreign: bool = False
    """Resume from a checkpoint folder even when another user owns it, group or others
    may write it, or its marker lists no sha256 per file (written before markers had
    them), and skip the sha256 check before loading. Resuming unpickles the optimizer
    state: only for a folder whose every writer you trust (docs/operations.md)."""


@dataclass
class CpmCheckConfig:
    """Guards against a CPM that silently never fires (its loss would be zero)."""

    prefix_samples: int = 1000
    """Training answers read at start-up to resolve model.cpm.answer_prefix="auto"
    (their most common spelling of the conclusion) and to check an explicit one."""
    abort_after_steps: int = 10
    """Stop the run when its first this many optimizer steps found no CPM position
    in any sample, naming the conclusion text expected (0: never stop). Every
    step without one is also logged as a warning with the batch's sample keys."""


@dataclass
class PerfConfig:
    """Model FLOPs utilisation (perf/mfu): the peak one device could deliver.

    perf/mfu = model FLOPs of the step's real tokens (modeling.costs.flops) /
    (step time x ranks x peak). Without a peak (CPU, an unknown GPU) perf/mfu is
    not logged; perf/model_tflops_per_s (achieved, per rank) always is."""

    peak_tflops: float | None = None
    """Dense peak TFLOP/s of one device in the training precision; null takes
    it from `gpu`. Set it for a GPU the table lacks or a precision it does not
    describe (the table is bf16/fp16 tensor cores; fp32 runs are lower)."""
    gpu: GpuName = "auto"
    """Which entry of modeling.costs.flops.PEAK_TFLOPS gives the peak when
    peak_tflops is null: "auto" matches torch.cuda.get_device_name() of the
    rank's device against the table (no CUDA device or no match: no perf/mfu,
    with a log line saying why), or a table key such as "H100" or "A100"."""


@dataclass
class OutputLockConfig:
    """One run per output_dir: global rank 0 holds <output_dir>/run.lock (sharding/dir_lock.py)."""

    enabled: bool = True
    """Take the lock; a second run into a held output_dir exits with status 2 naming the holder."""
    refresh_s: float = 30.0
    """Seconds between two heartbeats of the lock file (a thread on rank 0)."""
    stale_after_s: float = 600.0
    """A lock not refreshed for this long is taken over with a warning (its holder
    died on another node); must exceed 2 x refresh_s. A holder on the same host is
    checked directly (its pid), so a killed run's lock is taken over at once."""


@dataclass
class PreemptionConfig:
    """Stopping on request with a checkpoint (pipeline/training/preemption.py).

    A stop request is one of `signals` reaching a rank (the launcher, the process
    group or the rank itself), the launcher that started the ranks going away,
    or a file `<output_dir>/STOP` appearing. Every rank then finishes its
    current optimizer step (the request travels in the step's all-reduce, so
    all ranks stop after the same step), a complete checkpoint of that step is
    written, rank 0 writes `<output_dir>/PREEMPTED`, and every rank exits with
    status 75 ("preempted, resumable": continue with checkpoint.resume=auto)."""

    enabled: bool = True
    """Handle stop requests; false leaves the signals' default actions (no save)."""
    signals: tuple[str, ...] = STOP_SIGNALS
    """Signals that request a stop (names of Python's signal module). SLURM's
    `--signal=USR1@120` sends SIGUSR1 ahead of the time limit."""
    grace_s: float = 120.0
    """Seconds from the request to the end of the checkpoint: a rank still busy
    then exits with status 75 anyway, logging that the save did not complete (the
    newest complete checkpoint is still resumable). 0: no limit. Under DeepSpeed's
    node launcher a signal that reaches the launcher (Ctrl-C, a SIGTERM to the
    process group) is followed by its own SIGKILL 30 s later, whatever this says."""
    watch_launcher: bool = True
    """Treat the end of the launcher as a stop request: the rank's parent (the
    node launcher) and, under DeepSpeed's node launcher, the `deepspeed` runner
    above it, recorded with their start times at start-up."""
    stop_file: bool = True
    """Treat a file `<output_dir>/STOP` newer than the run's start as a stop
    request (a shared file system reaches every node; launch/slurm.example.sh
    touches it from its SIGUSR1 trap). A resumed run removes an older one."""
    poll_s: float = 2.0
    """Seconds between two looks at the launcher and the STOP file."""
