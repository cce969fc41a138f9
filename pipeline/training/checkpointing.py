"""Saving and restoring a training checkpoint through DeepSpeed.

The training state travels as DeepSpeed client state (`TrainState`). A save
ends with rank 0's COMPLETE marker and pointer (`mark_complete`; the folder's
layout and the marker's meaning: checkpoint_tags.py) and only then prunes older
tags. A restore first checks every file against the marker
(checkpoint_trust.py), because DeepSpeed unpickles its optimizer state. Which
checkpoint a run resumes from: resume.py; the final export: export.py.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from common.atomic_files import write_atomic
from pipeline import distributed as dist
from pipeline.training import checkpoint_space as space
from pipeline.training.checkpoint_tags import COMPLETE, POINTER, is_complete, prune, tag_for
from pipeline.training.checkpoint_trust import UntrustedCheckpoint, drop_group_other_write, verify_files

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where training stands; saved as DeepSpeed client state."""

    global_step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current data epoch (0-based)."""
    batch_in_epoch: int = 0
    """Micro-batches of `epoch` this rank has consumed (the loader's start_batch on resume)."""
    samples_seen: int = 0
    """Training samples consumed over all ranks."""
    skipped_batches: int = 0
    """Micro-batches skipped for a non-finite loss (nonfinite: skip)."""
    data_seed: int = 0
    """data.seed of the run (the stream is a function of it)."""
    wandb_run_id: str | None = None
    """W&B run to continue on resume."""
    world_size: int = 1
    """Ranks of the run that wrote the checkpoint (the stream depends on it)."""
    extra: dict = field(default_factory=dict)
    """Anything else worth keeping (config snapshot, timings)."""

    def to_client_state(self, config: dict) -> dict:
        d = asdict(self)
        d["config"] = config
        return {"train_state": d}

    @classmethod
    def from_client_state(cls, client: dict) -> "TrainState":
        d = dict(client.get("train_state") or {})
        if not d:
            raise ValueError("the checkpoint has no train_state client state (not written by this pipeline)")
        d.pop("config", None)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def mark_complete(ckpt_dir: str, tag: str, state: TrainState, hashed: Mapping[str, list] | None = None) -> None:
    """Rank 0, after every rank finished writing `tag`: marker, then pointer.

    hashed: {relative path: [bytes, sha256]} of the files hashed while written (all
    ranks'); a file not in it, or of another size now, is hashed here."""
    from sharding.shard_set import file_digest

    tag_dir = os.path.join(ckpt_dir, tag)
    files, digests = {}, {}
    for root, _, names in os.walk(tag_dir):
        for n in names:
            p = os.path.join(root, n)
            rel = os.path.relpath(p, tag_dir)
            files[rel] = os.path.getsize(p)
            known = (hashed or {}).get(rel)
            digests[rel] = known[1] if known and known[0] == files[rel] else file_digest(p)
    drop_group_other_write(ckpt_dir, tag_dir)
    marker = {"tag": tag, "global_step": state.global_step, "epoch": state.epoch,
              "batch_in_epoch": state.batch_in_epoch, "samples_seen": state.samples_seen,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files, "sha256": digests}
    write_atomic(os.path.join(tag_dir, COMPLETE), json.dumps(marker, indent=1, sort_keys=True))
    write_atomic(os.path.join(ckpt_dir, POINTER), tag)


def save_checkpoint(engine, ckpt_dir: str, state: TrainState, config: dict, keep_last: int,
                    is_main: bool, estimate: int | None = None, space_margin: float = 0.0) -> str:
    """All ranks: a DeepSpeed checkpoint of the current step, then the marker, then
    (rank 0) the pruning of older tags, which therefore never runs before the new
    checkpoint is complete. `estimate`: its size in bytes, checked against the free
    space first (`space_margin` > 0)."""
    tag = tag_for(state.global_step)
    t0 = time.monotonic()
    if space_margin > 0:  # rank 0 holds the estimate and decides for every rank
        space.check_space_everywhere(ckpt_dir, estimate or 0, space_margin, is_main)
    try:
        hashed = dist.save_engine_checkpoint(engine, ckpt_dir, tag, state.to_client_state(config))
    except (OSError, RuntimeError) as e:
        raise space.save_failure(e, os.path.join(ckpt_dir, tag), estimate) from e
    # DeepSpeed's save ends with a barrier, but its last file writes may be
    # asynchronous in other checkpoint engines: the gather is one more barrier after they return.
    every = dist.all_gather_objects(hashed)
    if is_main:
        mark_complete(ckpt_dir, tag, state, {rel: v for h in every for rel, v in h.items()})
        removed = prune(ckpt_dir, keep_last)
        log.info("checkpoint %s complete in %.1fs%s", os.path.join(ckpt_dir, tag), time.monotonic() - t0,
                 f" (removed {', '.join(removed)})" if removed else "")
    dist.barrier()
    return tag


def needs_final_save(ckpt_dir: str, step: int, save_final: bool) -> bool:
    """Whether the end of a run writes `global_step<step>` into `ckpt_dir`: always
    (with checkpoint.save_final) unless that tag is already complete there. A run
    resumed at its own last step therefore trains nothing and saves exactly the
    state it loaded, in its own checkpoint folder (how a universal checkpoint is
    turned back into an ordinary one for the new number of ranks)."""
    return save_final and not is_complete(ckpt_dir, tag_for(step))


def restore_train_state(engine, ckpt_dir: str, tag: str, verify: bool = True, rank: int = 0,
                        world_size: int = 1) -> TrainState:
    """All ranks: restore model, optimizer, scheduler and the training state.

    verify: first check every file against the sha256 of the tag's marker (each
    rank a share, `verify_files`); a problem on any rank is raised on every rank,
    before DeepSpeed unpickles anything. Off for universal checkpoints (their
    files are the conversion's, not the marker's) and with checkpoint.trust_foreign."""
    if verify:
        problems = [p for p in dist.all_gather_objects(verify_files(ckpt_dir, tag, rank, world_size)) if p]
        if problems:
            raise UntrustedCheckpoint(f"checkpoint {os.path.join(ckpt_dir, tag)} not loaded: {problems[0]}"
                                      + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    client = dist.load_engine_checkpoint(engine, ckpt_dir, tag)
    state = TrainState.from_client_state(client)
    if engine.global_steps != state.global_step:
        raise RuntimeError(f"checkpoint {tag}: engine step {engine.global_steps} != saved global_step "
                           f"{state.global_step}")
    return state


# --------------------------------------------------------------------------- metrics history

def drop_metrics_after(path: str, step: int) -> int:
    """Remove the records of `path` (metrics.jsonl) past `step`, atomically; returns
    how many were dropped. After a resume from the checkpoint of `step`, the steps
    the killed run logged after it are trained again, and would otherwise appear
    twice. A line that is not JSON (a write cut by the kill) is dropped too."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = int(record.get("step", 0)) <= step
            except (ValueError, TypeError, AttributeError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        write_atomic(path, "".join(kept))
        log.info("%s: dropped %d records past step %d (trained again after the resume)", path, dropped, step)
    return dropped
