"""ZeRO-3-partitioned parameters: what a rank holds, making them whole for a
block (a collective: every rank enters), and a full state dict gathered a
chunk at a time."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def is_partitioned(p: torch.nn.Parameter) -> bool:
    """The parameter is managed by ZeRO-3 (its data is a local partition, or empty, unless gathered)."""
    return hasattr(p, "ds_id")


def full_numel(p: torch.nn.Parameter) -> int:
    """Elements of the whole parameter, also when ZeRO-3 holds only a partition of it."""
    return p.ds_numel if is_partitioned(p) else p.numel()


def partition_numels(module: torch.nn.Module, trainable_only: bool = False) -> tuple[int, int]:
    """(elements this rank stores, elements of the whole model). Under ZeRO-3 a
    rank stores its partition `ds_tensor` of each parameter, plus the whole of
    the "persistent" ones (below stage3_param_persistence_threshold, kept
    gathered between uses); otherwise everything. `trainable_only`: count only
    the parameters that require grad (those with optimizer state)."""
    local = total = 0
    for p in module.parameters():
        if trainable_only and not p.requires_grad:
            continue
        if is_partitioned(p):
            local += p.ds_tensor.numel() + (p.ds_numel if getattr(p, "ds_persist", False) else 0)
            total += p.ds_numel
        else:
            local += p.numel()
            total += p.numel()
    return local, total


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Make ZeRO-3-partitioned `params` whole on every rank for the block.

    Every rank must enter (it is a collective). With `modifier_rank` set,
    changes made on that rank are re-partitioned to all ranks on exit.
    """
    part = [p for p in params if is_partitioned(p)]
    if not part:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(part, modifier_rank=modifier_rank):
        yield


def gather_state_dict(module: torch.nn.Module, rank: int, only_trainable: bool = False,
                      chunk_numel: int = 200_000_000) -> dict[str, torch.Tensor]:
    """A full CPU state dict of `module` on rank 0 ({} elsewhere).

    Parameters are gathered a chunk at a time (every rank takes part), so the
    peak extra memory per rank is one chunk, not the whole model.
    """
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not only_trainable]
    out: dict[str, torch.Tensor] = {}
    i = 0
    while i < len(named):
        chunk, size = [], 0
        while i < len(named) and (not chunk or size < chunk_numel):
            n, p = named[i]
            chunk.append((n, p))
            size += full_numel(p)
            i += 1
        with gathered([p for _, p in chunk]):
            if rank == 0:
                for n, p in chunk:
                    out[n] = p.detach().to("cpu", copy=True)
    if not only_trainable and rank == 0:
        # Buffers are never partitioned; non-persistent ones (rotary tables...) are
        # not part of a state dict.
        for mod_name, mod in module.named_modules():
            for n, b in mod.named_buffers(recurse=False):
                if b is not None and n not in mod._non_persistent_buffers_set:
                    out[f"{mod_name}.{n}" if mod_name else n] = b.detach().to("cpu", copy=True)
    return out
