"""Per-GPU memory of ZeRO's model states and buffers, from parameter counts alone.

The model states follow DeepSpeed's own estimator,
deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs (the
stage 2 one for stages 1-2): 18 bytes per parameter partitioned over the
ranks (the bf16 weight and 16 bytes of gradient and float32 optimizer states:
master weights and Adam's two moments), 2 with the optimizer offloaded, none
with the parameters offloaded too, plus 4 bytes per parameter of the largest
layer (its gathered bf16 weights and gradient). DeepSpeed counts every
parameter as trained; here the frozen ones (towers, the LLM under LoRA) hold
only their bf16 partition, so the figure is DeepSpeed's for the trainable
parameters plus 2 bytes per frozen one (tests/unit/pipeline/test_zero_memory.py
checks it against DeepSpeed's function). The stage-3 buffers come from the
generated DeepSpeed JSON's values.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemLine:
    """One per-GPU memory figure and how it is made."""

    name: str
    """What it is."""
    bytes: int
    """Bytes on each GPU."""
    formula: str
    """Its formula with the inputs filled in."""


def _n(x: float) -> str:
    """A count in short form: 1.23e9 -> 1.23 B, 4.5e7 -> 45 M."""
    for div, unit in ((1e9, " B"), (1e6, " M"), (1e3, " k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:g}"


def model_state_lines(trainable: int, frozen: int, largest_layer: int, world_size: int, stage: int = 3,
                      offload_optimizer: bool = False, offload_param: bool = False) -> list[MemLine]:
    """The model states on each GPU: trainable parameters' weights, gradients and
    optimizer states; the frozen parameters' weights; the largest layer."""
    w = world_size
    if stage == 3:
        if offload_optimizer:
            per_trainable = 0 if offload_param else 2
        else:  # parameters alone offloaded: DeepSpeed's estimator has no such case; 16 B stay
            per_trainable = 16 if offload_param else 18
        per_frozen = 0 if offload_param else 2
        states = int(per_trainable * trainable / w)
        frozen_b = int(per_frozen * frozen / w)
        where = (" (optimizer states on the CPU)" if offload_optimizer else "") + (
            " (parameters on the CPU)" if offload_param else "")
        return [
            MemLine("trainable: weights, gradients, optimizer states", states,
                    f"{per_trainable} B x {_n(trainable)} trainable / {w} GPUs{where}"),
            MemLine("frozen weights (partitioned)", frozen_b, f"{per_frozen} B x {_n(frozen)} frozen / {w} GPUs"),
            MemLine("largest layer gathered (weights + gradients)", 4 * largest_layer,
                    f"4 B x {_n(largest_layer)} (largest module)"),
        ]
    # Stages 0-2 keep every weight whole on every GPU. DeepSpeed's stage-2 estimator
    # (estimate_zero2_model_states_mem_needs): 2 B per parameter for the weights, and
    # 18 B per parameter over the ranks, nothing with the optimizer offloaded.
    total = trainable + frozen
    if stage == 0:
        states, formula = 18 * trainable, f"18 B x {_n(trainable)} trainable (stage 0: not partitioned)"
    else:
        states = 0 if offload_optimizer else int(18 * trainable / w)
        formula = (f"{0 if offload_optimizer else 18} B x {_n(trainable)} trainable / {w} GPUs"
                   + (" (optimizer states on the CPU)" if offload_optimizer else ""))
    return [
        MemLine("weights (whole on every GPU)", 2 * total, f"2 B x {_n(total)}"),
        MemLine("trainable: gradients, optimizer states", states, formula),
    ]


# DeepSpeed's default when the JSON does not set it.
MAX_LIVE_PARAMETERS = 1_000_000_000


def zero3_buffer_lines(zero: dict, persistent_params: int, largest_block: int) -> list[MemLine]:
    """Stage-3 buffers from the DeepSpeed JSON's zero_optimization section: the
    live parameters (the largest block, e.g. a decoder layer, gathered whole while
    it runs, at most stage3_max_live_parameters), the prefetch bucket, the gradient
    reduce bucket, and the parameters below the persistence threshold that stay
    whole on every GPU."""
    live_cap = int(zero.get("stage3_max_live_parameters", MAX_LIVE_PARAMETERS))
    live = min(largest_block, live_cap)
    prefetch = int(zero.get("stage3_prefetch_bucket_size", 50_000_000))
    reduce = int(zero.get("reduce_bucket_size", 500_000_000))
    threshold = int(zero.get("stage3_param_persistence_threshold", 100_000))
    return [
        MemLine("ZeRO-3 live parameters (a block gathered)", 2 * live,
                f"2 B x min(largest block {_n(largest_block)}, stage3_max_live_parameters {_n(live_cap)})"),
        MemLine("ZeRO-3 prefetch bucket", 2 * prefetch, f"2 B x stage3_prefetch_bucket_size {_n(prefetch)}"),
        MemLine("gradient reduce bucket", 2 * reduce, f"2 B x reduce_bucket_size {_n(reduce)}"),
        MemLine("persistent parameters (whole)", 2 * persistent_params,
                f"2 B x {_n(persistent_params)} in tensors under stage3_param_persistence_threshold "
                f"{_n(threshold)}"),
    ]
