"""What a run resumes from: `checkpoint.resume` (auto, a complete tag, or a
DeepSpeed universal checkpoint) resolved to a `ResumePoint`.

To resume on another number of ranks, convert a complete tag with DeepSpeed's
`python -m deepspeed.checkpoint.ds_to_universal --input_folder
CKPT/global_stepN --output_folder CKPT/global_stepN_universal` and pass that
folder as `checkpoint.resume`: its source's marker is checked and DeepSpeed's
`load_universal` is switched on for the run.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

from pipeline import distributed as dist
from pipeline.training.checkpoint_tags import COMPLETE, is_complete, newest_complete
from pipeline.training.checkpoint_trust import check_trusted

UNIVERSAL_SUFFIX = "_universal"  # DeepSpeed's naming of a ds_to_universal output folder


class ResumePoint(NamedTuple):
    """What to load: DeepSpeed's (load_dir, tag), and whether it is a universal
    checkpoint (DeepSpeed must then be configured with load_universal)."""

    dir: str
    tag: str
    universal: bool = False


def resolve_resume(resume: str | None, ckpt_dir: str, trust_foreign: bool = False) -> ResumePoint | None:
    """The checkpoint to resume from, or None for a fresh start.

    `resume` is "auto" (the newest complete tag in `ckpt_dir`), a complete tag
    folder of this pipeline, or a folder written by DeepSpeed's `ds_to_universal`
    from a complete tag (to resume on a different number of ranks). Unless
    `trust_foreign`, the chosen folder must pass `check_trusted`."""
    if resume is None:
        return None
    if resume == "auto":
        tag = newest_complete(ckpt_dir)
        if tag and not trust_foreign:
            check_trusted(os.path.join(ckpt_dir, tag), "checkpoint.resume=auto")
        return ResumePoint(ckpt_dir, tag) if tag else None
    path = os.path.abspath(resume.rstrip("/"))
    parent, tag = os.path.dirname(path), os.path.basename(path)
    if dist.is_universal_checkpoint(path):
        check_universal_source(path, resume)
        if not trust_foreign:
            check_trusted(path, f"checkpoint.resume={resume}")
        return ResumePoint(parent, tag, universal=True)
    if not is_complete(parent, tag):
        raise FileNotFoundError(f"checkpoint.resume={resume}: no {COMPLETE} marker in {path}; "
                                "it is not a complete checkpoint of this pipeline")
    if not trust_foreign:
        check_trusted(path, f"checkpoint.resume={resume}")
    return ResumePoint(parent, tag)


def universal_source(path: str) -> str | None:
    """The tag folder a universal checkpoint was converted from, by DeepSpeed's
    naming convention: `<dir>/global_stepN_universal` comes from `<dir>/global_stepN`."""
    parent, name = os.path.split(os.path.abspath(path.rstrip("/")))
    if name.endswith(UNIVERSAL_SUFFIX) and len(name) > len(UNIVERSAL_SUFFIX):
        return os.path.join(parent, name[:-len(UNIVERSAL_SUFFIX)])
    return None


def check_universal_source(path: str, resume: str | None = None) -> str:
    """Raise unless a universal checkpoint provably comes from a complete checkpoint.

    The proof is a COMPLETE marker: the folder's own (copied from its source by
    the user) or else its source tag's (`universal_source`). ds_to_universal
    copies the source's `*_model_states.pt` as they were at conversion time, so
    they must match the files the marker lists: a conversion that ran while the
    source was still being written (the marker appeared later) is refused too.
    Returns the marker used."""
    what = f"checkpoint.resume={resume or path}"
    own = os.path.join(path, COMPLETE)
    source = universal_source(path)
    if os.path.isfile(own):
        marker_path = own
    elif source is not None and os.path.isfile(os.path.join(source, COMPLETE)):
        marker_path = os.path.join(source, COMPLETE)
    else:
        where = (f"its source {source} has no {COMPLETE} marker (still being written, interrupted, or "
                 f"deleted)" if source is not None else
                 f"its name does not end in {UNIVERSAL_SUFFIX!r}, so its source tag is unknown")
        raise FileNotFoundError(
            f"{what} is a DeepSpeed universal checkpoint, but nothing shows it was converted from a "
            f"complete checkpoint: {where}, and it has no {COMPLETE} marker of its own. Convert a complete "
            f"tag with `python -m deepspeed.checkpoint.ds_to_universal --input_folder CKPT/global_stepN "
            f"--output_folder CKPT/global_stepN{UNIVERSAL_SUFFIX}`; if the source has since been deleted, "
            f"copy its {COMPLETE} file into {path}")
    try:
        with open(marker_path, encoding="utf-8") as f:
            files = json.load(f).get("files") or {}
    except (OSError, ValueError, AttributeError) as e:
        raise FileNotFoundError(f"{what}: cannot read the marker {marker_path}: {e}") from None
    expected = {os.path.basename(n): size for n, size in files.items() if n.endswith("_model_states.pt")}
    found = {n: os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith("_model_states.pt")}
    if expected and expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))[:4]
        raise FileNotFoundError(
            f"{what}: its *_model_states.pt files differ from those the complete checkpoint lists in "
            f"{marker_path} (name, bytes: {diff}); it was converted from another or an unfinished "
            f"checkpoint: convert the complete tag again")
    return marker_path
