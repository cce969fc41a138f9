"""The checkpoint folder's tags: names, COMPLETE markers, the latest_complete
pointer, sizes and pruning.

Layout under the checkpoint folder:

  ds_config.json            the DeepSpeed JSON the run used
  zero_to_fp32.py           DeepSpeed's consolidation script (copied by DeepSpeed)
  latest                    DeepSpeed's own pointer (written before every rank is done: not trusted)
  latest_complete           our pointer: the tag of the newest complete checkpoint
  global_step<N>/           one DeepSpeed tag (model + optimizer partitions + client state)
  global_step<N>/COMPLETE   written by rank 0 after every rank has finished writing

A checkpoint counts only if its COMPLETE marker exists. The marker is written
(atomically, fsync'd) after DeepSpeed's closing barrier, and the pointer is
updated (atomic rename) after the marker (checkpointing.py mark_complete), so a
kill at any moment leaves either the previous complete checkpoint or the new
one as "newest complete", never a half-written one. `resume: auto` also
survives a lost or stale pointer: it takes the highest step among tags that
have a marker. The marker's per-file sha256 is what a resume checks
(checkpoint_trust.py).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil

from common.atomic_files import is_link

# The checkpoint modules log under one name, the one of their common entry point.
log = logging.getLogger("pipeline.training.checkpointing")

COMPLETE = "COMPLETE"
POINTER = "latest_complete"
_TAG = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    """The tag (folder name) of the checkpoint of `step`."""
    return f"global_step{step}"


def step_of(tag: str) -> int | None:
    """The step a tag names, or None for a name that is no tag of ours."""
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def is_complete(ckpt_dir: str, tag: str) -> bool:
    """Whether `tag` has its COMPLETE marker."""
    return os.path.isfile(os.path.join(ckpt_dir, tag, COMPLETE))


def complete_tags(ckpt_dir: str) -> list[str]:
    """Complete tags, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if step_of(t) is not None and is_complete(ckpt_dir, t)]
    return sorted(tags, key=step_of)


def newest_complete(ckpt_dir: str) -> str | None:
    """The pointer's tag when it is valid, else the highest complete step."""
    pointer = os.path.join(ckpt_dir, POINTER)
    tags = complete_tags(ckpt_dir)
    try:
        with open(pointer, encoding="utf-8") as f:
            tag = f.read().strip()
        if tag and is_complete(ckpt_dir, tag) and (not tags or step_of(tag) == step_of(tags[-1])):
            return tag
    except FileNotFoundError:
        pass
    return tags[-1] if tags else None


def prune(ckpt_dir: str, keep_last: int) -> list[str]:
    """Delete complete checkpoints beyond the newest `keep_last`, and incomplete
    tags older than the newest complete one (leftovers of interrupted saves).
    A tag that is a symbolic link is left alone with a warning: deleting through
    it would delete (or un-mark) whatever folder it points at."""
    tags = complete_tags(ckpt_dir)
    removed = []
    doomed = tags[:-keep_last] if keep_last > 0 else []
    if tags:
        newest = step_of(tags[-1])
        for t in os.listdir(ckpt_dir):
            s = step_of(t)
            if s is not None and s < newest and not is_complete(ckpt_dir, t):
                doomed.append(t)
    for t in doomed:
        path = os.path.join(ckpt_dir, t)
        if is_link(path):
            log.warning("prune: %s is a symbolic link; not deleting through it (remove the link yourself)", path)
            continue
        # Drop the marker first: a crash during rmtree leaves an incomplete tag, never a
        # "complete" one with missing files.
        try:
            os.remove(os.path.join(path, COMPLETE))
        except FileNotFoundError:
            pass
        shutil.rmtree(path, ignore_errors=True)  # path is no link (checked above)
        removed.append(t)
    return removed


# --------------------------------------------------------------------------- checkpoint sizes

def checkpoint_bytes(ckpt_dir: str, tag: str) -> int | None:
    """Size of a complete checkpoint as its marker lists it (None: no readable marker)."""
    try:
        with open(os.path.join(ckpt_dir, tag, COMPLETE), encoding="utf-8") as f:
            return int(sum(json.load(f)["files"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def newest_checkpoint_bytes(ckpt_dir: str) -> int | None:
    """Size of the newest complete checkpoint in `ckpt_dir` (None: none yet)."""
    newest = newest_complete(ckpt_dir)
    return checkpoint_bytes(ckpt_dir, newest) if newest else None
