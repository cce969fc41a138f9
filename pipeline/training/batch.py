"""The global batch of a run: micro-batch x gradient accumulation x ranks.

A recipe states either the accumulation (`loop.grad_accum`) or the global batch
(`loop.global_batch`, the paper's 128). With the global batch, the accumulation
is derived at start from the world size and `data.batch_size`, so the same
recipe keeps its optimisation on 8 or 64 GPUs and after a resume on another
world size. A global batch that micro-batch x ranks does not divide stops the
run before anything starts, naming the three numbers and the nearest valid
choices (pure arithmetic: the CLI checks it from the launcher's WORLD_SIZE, the
run again from its process group, `--plan` for the world it plans).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from common.config_loading import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's samples are made."""

    micro_batch: int
    """Samples per rank per forward/backward (data.batch_size)."""
    grad_accum: int
    """Micro-batches accumulated per optimizer step."""
    world_size: int
    """Ranks (GPUs) of the run."""
    source: str
    """Which field decided the accumulation: "loop.global_batch" or "loop.grad_accum"."""

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def record(self) -> dict:
        """What run_info.json and the W&B config keep of it."""
        return {"global_batch": self.global_batch, "micro_batch": self.micro_batch,
                "grad_accum": self.grad_accum, "world_size": self.world_size, "grad_accum_from": self.source}

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = micro-batch {self.micro_batch} x accumulation "
                f"{self.grad_accum} x {self.world_size} rank(s)")


def launcher_world_size(environ=None) -> int:
    """The world size the launcher gives this process (deepspeed, torchrun and
    SLURM wrappers set WORLD_SIZE); 1 for a plain `python` run."""
    value = (environ if environ is not None else os.environ).get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _closest(values: list[int], target: int) -> list[int]:
    """The nearest value below target and the nearest above it (those that exist)."""
    below = [v for v in values if v < target]
    above = [v for v in values if v > target]
    return ([max(below)] if below else []) + ([min(above)] if above else [])


def nearest_choices(global_batch: int, micro_batch: int, world_size: int) -> dict[str, list[int]]:
    """Valid neighbours of a global batch that micro_batch x world_size does not
    divide: the nearest global batches for this micro-batch and world size, the
    micro-batches (up to twice this one) that divide the global batch on this world
    size, and the world sizes (up to twice this one) that work with this micro-batch."""
    unit = micro_batch * world_size
    below, above = (global_batch // unit) * unit, (global_batch // unit + 1) * unit
    out = {"loop.global_batch": [g for g in (below, above) if g > 0]}
    if global_batch % world_size == 0:
        out["data.batch_size"] = _closest([d for d in _divisors(global_batch // world_size)
                                           if d <= 2 * micro_batch], micro_batch)
    if global_batch % micro_batch == 0:
        out["ranks"] = _closest([d for d in _divisors(global_batch // micro_batch) if d <= 2 * world_size],
                                world_size)
    return {k: v for k, v in out.items() if v}


def batch_plan(global_batch: int | None, grad_accum: int | None, micro_batch: int, world_size: int) -> BatchPlan:
    """The step's make-up on `world_size` ranks; ConfigError when the global batch
    does not divide or disagrees with an accumulation set too."""
    if global_batch is None:
        return BatchPlan(micro_batch, grad_accum or 1, world_size, "loop.grad_accum")
    unit = micro_batch * world_size
    if global_batch % unit:
        hints = "; ".join(f"{k}={' or '.join(map(str, v))}" for k, v in
                          nearest_choices(global_batch, micro_batch, world_size).items())
        raise ConfigError(
            f"loop.global_batch={global_batch} is not a multiple of data.batch_size={micro_batch} x "
            f"{world_size} rank(s) = {unit}, so no whole gradient accumulation gives it. Nearest valid "
            f"choices: {hints}")
    derived = global_batch // unit
    if grad_accum is not None and grad_accum != derived:
        raise ConfigError(
            f"loop.grad_accum={grad_accum} disagrees with loop.global_batch={global_batch}: on {world_size} "
            f"rank(s) with data.batch_size={micro_batch} the global batch needs accumulation {derived} "
            f"(global batch {micro_batch * grad_accum * world_size} with {grad_accum}). Set only one of them")
    return BatchPlan(micro_batch, derived, world_size, "loop.global_batch")


def plan_for(cfg, world_size: int) -> BatchPlan:
    """batch_plan of a TrainConfig."""
    return batch_plan(cfg.loop.global_batch, cfg.loop.grad_accum, cfg.data.batch_size, world_size)


def resume_note(saved: dict | None, saved_world_size: int, plan: BatchPlan) -> tuple[bool, str] | None:
    """What a resume should log about the batch: (is_warning, message), or None
    when nothing changed. `saved` is the checkpoint's BatchPlan.record() (None for a
    checkpoint written before it was kept); `saved_world_size` the ranks that wrote it."""
    if saved is None:
        if saved_world_size == plan.world_size:
            return None
        return (False, f"resuming on {plan.world_size} rank(s) a checkpoint written by {saved_world_size}: "
                       f"{plan.describe()} (the checkpoint does not record its global batch)")
    if saved.get("global_batch") == plan.global_batch:
        if saved.get("world_size") == plan.world_size and saved.get("grad_accum") == plan.grad_accum:
            return None
        return (False, f"resuming on {plan.world_size} rank(s) a checkpoint written by {saved.get('world_size')}: "
                       f"global batch {plan.global_batch} kept ({plan.source}); micro-batch {plan.micro_batch} x "
                       f"accumulation {plan.grad_accum} x {plan.world_size} (was {saved.get('micro_batch')} x "
                       f"{saved.get('grad_accum')} x {saved.get('world_size')})")
    return (True, f"the global batch changes on resume: {saved.get('global_batch')} (micro-batch "
                  f"{saved.get('micro_batch')} x accumulation {saved.get('grad_accum')} x "
                  f"{saved.get('world_size')} rank(s)) -> {plan.describe()}; set "
                  f"loop.global_batch={saved.get('global_batch')} to keep it")


__all__ = ["BatchPlan", "batch_plan", "launcher_world_size", "nearest_choices", "plan_for",
           "resume_note"]
