"""Learning-rate schedule: linear warm-up then cosine (or constant) decay.

A pure function of the optimizer step, so that it is unit-testable without
DeepSpeed and a resumed run (whose LambdaLR restores `last_epoch` from the
engine checkpoint) follows exactly the same curve.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class LRSchedule:
    """Multiplier of the peak learning rate at each optimizer step."""

    total_steps: int
    """Optimizer steps of the whole run (the cosine horizon)."""
    warmup_steps: int
    """Steps of linear warm-up; step 0 runs at lr / warmup_steps... never exactly 0."""
    kind: str = "cosine"
    """"cosine" or "constant" after warm-up."""
    min_ratio: float = 0.0
    """Floor of the cosine as a fraction of the peak."""

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, {self.total_steps}], got {self.warmup_steps}")
        if self.kind not in ("cosine", "constant"):
            raise ValueError(f"unknown schedule {self.kind!r}")

    def __call__(self, step: int) -> float:
        """Multiplier for the update made at 0-based optimizer step `step`."""
        if step < self.warmup_steps:
            # (step + 1): the first update already moves the weights (HF's
            # schedule starts at 0 and wastes a step of compute on a no-op).
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * cosine


def build_schedule(total_steps: int, warmup_ratio: float, warmup_steps: int | None,
                   kind: str, min_ratio: float) -> Callable[[int], float]:
    """Warm-up from an explicit step count, or ceil(ratio x total) (the paper's 3%)."""
    if warmup_steps is None:
        warmup_steps = math.ceil(warmup_ratio * total_steps)
    return LRSchedule(total_steps, min(warmup_steps, total_steps), kind, min_ratio)
