"""Crash-safe checkpoints, resume, and the final export.

Layout under the checkpoint folder:

  ds_config.json            the DeepSpeed JSON the run used
  zero_to_fp32.py           DeepSpeed's consolidation script (copied by DeepSpeed)
  latest                    DeepSpeed's own pointer (written before every rank is done: not trusted)
  latest_complete           our pointer: the tag of the newest complete checkpoint
  global_step<N>/           one DeepSpeed tag (model + optimizer partitions + client state)
  global_step<N>/COMPLETE   written by rank 0 after every rank has finished writing

A checkpoint counts only if its COMPLETE marker exists. The marker lists every
file of the tag with its size and sha256 (hashed while DeepSpeed writes it:
pipeline/distributed/engine.py use_hashing_checkpoint_engine), and every file
is checked against it before DeepSpeed loads anything, because DeepSpeed
unpickles its optimizer state (`torch.load(weights_only=False)`): a file
swapped after the save is refused, naming it. A checkpoint folder that another
user owns or that group or others may write is refused as well (anyone who
can write there can make the next resume run their code) unless
`checkpoint.trust_foreign=true`; rank 0 removes group/other write permission
from every tag it completes, so a run's own checkpoints always pass. The marker is written
(atomically, fsync'd) after DeepSpeed's closing barrier, and the pointer is
updated (atomic rename) after the marker, so a kill at any moment leaves
either the previous complete checkpoint or the new one as "newest complete",
never a half-written one. `resume: auto` also survives a lost or stale
pointer: it takes the highest step among tags that have a marker.

To resume on another number of ranks, convert a complete tag with DeepSpeed's
`python -m deepspeed.checkpoint.ds_to_universal --input_folder
CKPT/global_stepN --output_folder CKPT/global_stepN_universal` and pass that
folder as `checkpoint.resume`: its source's marker is checked and DeepSpeed's
`load_universal` is switched on for the run.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

from common.atomic_files import RefusedLink, is_link, new_dir_beside, replace_dir, write_atomic
from pipeline import distributed as dist
from pipeline.training import checkpoint_space as space

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
POINTER = "latest_complete"
UNIVERSAL_SUFFIX = "_universal"  # DeepSpeed's naming of a ds_to_universal output folder
_TAG = re.compile(r"^global_step(\d+)$")


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


def tag_for(step: int) -> str:
    return f"global_step{step}"


def step_of(tag: str) -> int | None:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def is_complete(ckpt_dir: str, tag: str) -> bool:
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
    _drop_group_other_write(ckpt_dir, tag_dir)
    marker = {"tag": tag, "global_step": state.global_step, "epoch": state.epoch,
              "batch_in_epoch": state.batch_in_epoch, "samples_seen": state.samples_seen,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files, "sha256": digests}
    write_atomic(os.path.join(tag_dir, COMPLETE), json.dumps(marker, indent=1, sort_keys=True))
    write_atomic(os.path.join(ckpt_dir, POINTER), tag)


def _drop_group_other_write(ckpt_dir: str, tag_dir: str) -> None:
    """chmod go-w the tag folder, its files and (when ours) the checkpoint folder, so
    that the trust check (`check_trusted`) passes for the run's own checkpoints
    whatever the umask."""
    paths = [tag_dir] + [os.path.join(root, n) for root, dirs, names in os.walk(tag_dir) for n in dirs + names]
    if os.stat(ckpt_dir).st_uid == os.getuid():
        paths.append(ckpt_dir)
    for p in paths:
        mode = os.lstat(p).st_mode
        if not stat.S_ISLNK(mode) and mode & 0o022:
            os.chmod(p, stat.S_IMODE(mode) & ~0o022)


class UntrustedCheckpoint(OSError):
    """A checkpoint that may have been written by someone else (the message says why)."""


def check_trusted(folder: str, what: str) -> None:
    """Raise UntrustedCheckpoint unless `folder`, its parent (the checkpoint folder)
    and every file in it are owned by this user, not writable by group or others,
    and not symbolic links. DeepSpeed unpickles checkpoint files: whoever can
    write them can run code in every rank of the next resume."""
    uid = os.getuid()
    parent = os.path.dirname(os.path.abspath(folder))
    paths = [parent, folder] + [os.path.join(root, n) for root, dirs, names in os.walk(folder) for n in dirs + names]
    for p in paths:
        st = os.lstat(p)
        why = ("is a symbolic link" if stat.S_ISLNK(st.st_mode) else
               f"is owned by uid {st.st_uid}, not this user ({uid})" if st.st_uid != uid else
               f"is writable by {'group' if st.st_mode & 0o020 else 'others'} (mode {stat.S_IMODE(st.st_mode):o})"
               if st.st_mode & 0o022 else None)
        if why:
            raise UntrustedCheckpoint(
                f"{what}: refusing {folder}: {p} {why}. Resuming unpickles the checkpoint (DeepSpeed's "
                f"optimizer state), so anyone who can write it can run code in every rank. Check it, then "
                f"`chmod -R go-w` it (and take ownership), or set checkpoint.trust_foreign=true")


def verify_files(ckpt_dir: str, tag: str, rank: int = 0, world_size: int = 1) -> str | None:
    """Check this rank's share of `tag`'s files against the sha256 its marker lists
    (file i of the sorted list goes to rank i mod world_size, so the ranks share
    the reading); the problem found, naming the file, or None."""
    from sharding.shard_set import file_digest

    tag_dir = os.path.join(ckpt_dir, tag)
    marker_path = os.path.join(tag_dir, COMPLETE)
    try:
        with open(marker_path, encoding="utf-8") as f:
            marker = json.load(f)
        digests, sizes = marker["sha256"], marker["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return (f"{marker_path} lists no sha256 per file ({type(e).__name__}: {e}); it was written before "
                f"checkpoints recorded them, or not by this pipeline. If it is your own, resume once with "
                f"checkpoint.trust_foreign=true")
    on_disk = {os.path.relpath(os.path.join(root, n), tag_dir)
               for root, _, names in os.walk(tag_dir) for n in names} - {COMPLETE}
    if rank == 0 and on_disk - set(digests):
        return f"{tag_dir}: files not in its marker: {sorted(on_disk - set(digests))[:5]}"
    for i, rel in enumerate(sorted(digests)):
        if i % world_size != rank:
            continue
        p = os.path.join(tag_dir, rel)
        if not os.path.isfile(p):
            return f"{p}: listed in {marker_path} but missing"
        if os.path.getsize(p) != sizes.get(rel):
            return f"{p}: {os.path.getsize(p)} bytes, the marker says {sizes.get(rel)}"
        if file_digest(p) != digests[rel]:
            return f"{p}: sha256 differs from the one {marker_path} recorded when it was saved"
    return None


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


# --------------------------------------------------------------------------- final export

def export_final(model, build_plain_model, tokenizer, out_dir: str, rank: int,
                 card: Mapping | str | None = None) -> dict[str, str]:
    """Every rank: gather the ZeRO-3 partitions; rank 0 writes

      <out_dir>/trainable/   LoRA adapter + the non-LoRA trainables (modeling.checkpoints.checkpoint.save_trainable)
      <out_dir>/merged/      the merged model directory (modeling.checkpoints.checkpoint.export_merged)

    `build_plain_model()` makes an unpartitioned model of the same architecture
    on rank 0, into which the gathered full state dict is loaded. `card`: the
    training section of both folders' README.md (the run's config dict, or
    markdown; modeling.checkpoints.model_card).
    """
    from modeling.checkpoints.checkpoint import export_merged, save_trainable

    state = dist.gather_state_dict(model, rank)
    paths = {"trainable": os.path.join(out_dir, "trainable"), "merged": os.path.join(out_dir, "merged")}
    # Each folder is built beside its final name and swapped in (atomic_files.replace_dir):
    # a crash while exporting leaves the previous export whole, never none at all.
    if rank == 0:
        with dist.plain_construction():
            plain = build_plain_model()
        missing, unexpected = plain.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"export: gathered state does not fit the model "
                               f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        plain.eval()
        for p in paths.values():
            if is_link(p):  # before the minutes of writing, not only at the swap
                raise RefusedLink(f"export: {p} is a symbolic link; refusing to replace what it points at")
        staged = {k: new_dir_beside(p) for k, p in paths.items()}
        try:
            save_trainable(plain, staged["trainable"], training=card)
            export_merged(plain, tokenizer, staged["merged"], training=card)
        except BaseException:
            for d in staged.values():
                shutil.rmtree(d, ignore_errors=True)  # our own fresh folders (mkdtemp)
            raise
        for k, p in paths.items():
            replace_dir(staged[k], p)
    dist.barrier()
    return paths
