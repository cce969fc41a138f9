"""Resumable evaluation: per-batch partial output under `cfg.out/partial/`.

The unit of resumption is the global batch: the `batch_size` images of the
planned item list starting at a multiple of `batch_size` (data.rank_slice cuts
ranks at these positions and runner.batch_seed seeds sampling from a batch's
first image, so a batch's answers do not depend on which rank scores it, nor
on how many ranks there are).

Layout of `cfg.out/partial/`:
- `fingerprint.json`: what the predictions depend on (checkpoint sha256,
  protocol, generation settings, seed, batch size, dtype, perturbations, face
  crop, a hash of the planned set/key order). A rerun whose fingerprint differs
  refuses to mix outputs (`ResumeMismatch`, exit status 2 from the CLI) until
  `--restart` deletes the folder.
- `attempt{A}-rank{R}-of-{W}.jsonl`: one JSON line per finished batch of rank R
  in attempt A of the run: {"start", "rows", "failures", "perturbed",
  "forwards", "scored"}, flushed and fsync'ed after every batch. A new attempt
  writes new files, so a line cut by a kill is never appended to; such lines
  (and any that do not match the plan) are ignored, counted and logged.

On a rerun rank 0 reads every partial file, the batches found there are taken
as they are, and the remaining batches are split among the ranks of the new
run, whatever their number.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from common.atomic_files import remove_tree, write_atomic
log = logging.getLogger(__name__)

PARTIAL_DIR = "partial"
FINGERPRINT_FILE = "fingerprint.json"
_PART_NAME = re.compile(r"attempt(\d+)-rank\d+-of-\d+\.jsonl$")


class ResumeMismatch(RuntimeError):
    """The partial output in cfg.out was written by a run with other settings."""


@dataclass
class BatchRecord:
    """What one finished global batch produced (one line of a partial file)."""

    start: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    perturbed: list[dict[str, Any]] = field(default_factory=list)
    forwards: int = 0
    scored: int = 0

    @property
    def images(self) -> int:
        """Clean images of the batch: scored rows plus loader failures."""
        return len(self.rows) + len(self.failures)


@dataclass
class ResumeState:
    """Rank 0's view of the partial folder at the start of a run."""

    directory: str
    attempt: int
    done: dict[int, BatchRecord]
    ignored_lines: int = 0

    @property
    def resumed_images(self) -> int:
        return sum(r.images for r in self.done.values())


def partial_dir(out: str) -> str:
    return os.path.join(out, PARTIAL_DIR)


def items_hash(items: Sequence[Any]) -> str:
    """sha256 of the planned (set, shard, index) order (local shards by absolute path)."""
    h = hashlib.sha256()
    for it in items:
        url = os.path.abspath(it.url) if os.path.exists(it.url) else it.url
        h.update(f"{it.set_name}\0{url}\0{it.index}\n".encode())
    return h.hexdigest()


def fingerprint(cfg, items: Sequence[Any], identity: dict[str, Any]) -> dict[str, Any]:
    """Everything that changes the predictions of a run (JSON-comparable values)."""
    return json.loads(json.dumps({
        "checkpoint_sha256": identity["sha256"], "protocol": cfg.protocol, "generation": cfg.generation(),
        "seed": cfg.seed, "batch_size": cfg.batch_size, "dtype": cfg.dtype, "perturb": list(cfg.perturb),
        "face_crop": cfg.face_crop, "items": len(items), "items_sha256": items_hash(items),
    }))


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names of the fields that differ ("generation.max_new_tokens", "seed", ...)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{sub}" for sub in fingerprint_diff(a, b)]
        elif a != b:
            out.append(k)
    return out


def _mismatch(directory: str, fields: list[str], old: dict, new: dict) -> ResumeMismatch:
    def value(d: dict, name: str) -> Any:
        for part in name.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    shown = "; ".join(f"{f}: {value(old, f)!r} before, {value(new, f)!r} now" for f in fields)
    return ResumeMismatch(
        f"{directory} holds partial output of a run with other settings ({shown}); refusing to mix "
        f"predictions: rerun with the same arguments to resume, or pass --restart to discard the "
        f"partial output and start over")


def write_fingerprint(directory: str, fp: dict[str, Any]) -> None:
    """Atomically write fingerprint.json (a kill never leaves half a file)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, FINGERPRINT_FILE)
    write_atomic(path, json.dumps(fp, indent=2, sort_keys=True))


def check_fingerprint(directory: str, fp: dict[str, Any]) -> None:
    """Write the fingerprint of a fresh folder, or raise ResumeMismatch when the
    folder's differs (or is missing while batch files are there)."""
    path = os.path.join(directory, FINGERPRINT_FILE)
    if not os.path.isfile(path):
        if part_files(directory):
            raise ResumeMismatch(f"{directory} holds partial output but no {FINGERPRINT_FILE}; pass --restart "
                                 f"to discard it and start over")
        write_fingerprint(directory, fp)
        return
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except ValueError as exc:
        raise ResumeMismatch(f"{path}: unreadable ({exc}); pass --restart to discard the partial output") from None
    fields = fingerprint_diff(old, fp)
    if fields:
        raise _mismatch(directory, fields, old, fp)


def part_files(directory: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(directory, "*.jsonl")) if _PART_NAME.search(p))


def batch_sizes(n_items: int, batch_size: int) -> dict[int, int]:
    """Global batch start -> number of images in it."""
    return {s: min(batch_size, n_items - s) for s in range(0, n_items, batch_size)}


def _parse_line(line: str, sizes: dict[int, int]) -> BatchRecord | None:
    """The record of one line, or None when it is cut or does not fit the plan."""
    try:
        d = json.loads(line)
        rec = BatchRecord(int(d["start"]), list(d["rows"]), list(d["failures"]), list(d["perturbed"]),
                          int(d["forwards"]), int(d["scored"]))
    except (ValueError, KeyError, TypeError):
        return None
    return rec if sizes.get(rec.start) == rec.images else None


def load_done(directory: str, n_items: int, batch_size: int) -> tuple[dict[int, BatchRecord], int]:
    """(finished batches by start, number of ignored lines) of every partial file."""
    sizes = batch_sizes(n_items, batch_size)
    done: dict[int, BatchRecord] = {}
    ignored = 0
    for path in part_files(directory):
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec = _parse_line(line, sizes)
                if rec is None:
                    ignored += 1
                    log.warning("%s line %d: cut or not of this run's plan; ignored (the batch is rescored)",
                                path, number)
                    continue
                done.setdefault(rec.start, rec)
    return done, ignored


def next_attempt(directory: str) -> int:
    numbers = [int(_PART_NAME.search(p).group(1)) for p in part_files(directory)]
    return max(numbers, default=0) + 1


def prepare(cfg, items: Sequence[Any], identity: dict[str, Any], restart: bool = False) -> ResumeState:
    """Rank 0, before any rank writes: clear the folder on restart, check or write
    the fingerprint, read the batches already done."""
    directory = partial_dir(cfg.out)
    if restart and os.path.isdir(directory):
        log.warning("--restart: deleting the partial output in %s", directory)
        remove_tree(directory)  # refuses a symbolic link instead of emptying its target
    check_fingerprint(directory, fingerprint(cfg, items, identity))
    done, ignored = load_done(directory, len(items), cfg.batch_size)
    state = ResumeState(directory, next_attempt(directory), done, ignored)
    if done or ignored:
        announce(state, len(items))
    return state


def announce(state: ResumeState, total: int) -> None:
    """The "resuming: N of M images already scored in DIR" line (stderr and log)."""
    msg = f"resuming: {state.resumed_images} of {total} images already scored in {state.directory}"
    if state.ignored_lines:
        msg += f" ({state.ignored_lines} cut or unusable line(s) ignored)"
    log.info(msg)
    print(msg, file=sys.stderr, flush=True)


def remaining_starts(n_items: int, batch_size: int, done: Sequence[int] | set[int]) -> list[int]:
    """Starts of the global batches not done yet, in list order."""
    done = set(done)
    return [s for s in range(0, n_items, batch_size) if s not in done]


def split_starts(starts: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Contiguous, disjoint, covering share of `starts` for a rank (sizes differ by at most one)."""
    n = len(starts)
    return list(starts[rank * n // world_size:(rank + 1) * n // world_size])


def items_of(items: Sequence[Any], starts: Sequence[int], batch_size: int) -> list[Any]:
    """The items of the given global batches, in order; every batch but the list's
    last is whole, so the loader's batches of this list are those global batches."""
    return [it for s in starts for it in items[s:s + batch_size]]


def position_index(items: Sequence[Any]) -> dict[tuple[str, str, int], int]:
    """(set, shard url, index) -> position in the planned list."""
    return {(it.set_name, it.url, it.index): pos for pos, it in enumerate(items)}


class PartialWriter:
    """Appends one fsync'ed JSON line per finished batch to this rank's file; also
    keeps the records of this run (gathered to rank 0 at the end)."""

    def __init__(self, directory: str, attempt: int, rank: int, world_size: int,
                 items: Sequence[Any], batch_size: int):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"attempt{attempt}-rank{rank}-of-{world_size}.jsonl")
        self.batch_size = batch_size
        self.positions = position_index(items)
        self.records: list[BatchRecord] = []
        self._f = open(self.path, "a", encoding="utf-8")

    def start_of(self, entries: Sequence[dict[str, Any]]) -> int:
        """Global batch start of a loader batch, from its first sample or failure."""
        first = min(self.positions[(e["set"], e["shard"], e["index"])] for e in entries)
        return first - first % self.batch_size

    def __call__(self, rows, failures, perturbed, forwards: int, scored: int) -> None:
        """Record one finished batch (score_items' on_batch hook)."""
        rec = BatchRecord(self.start_of([*rows, *failures]), list(rows), list(failures), list(perturbed),
                          forwards, scored)
        self._f.write(json.dumps(rec.__dict__, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.records.append(rec)

    def close(self) -> None:
        self._f.close()


def merge(records: Sequence[BatchRecord]) -> tuple[list, list, list, int, int]:
    """(rows, failures, perturbed, forwards, scored) of records, in global batch order."""
    rows: list = []
    failures: list = []
    perturbed: list = []
    forwards = scored = 0
    for rec in sorted(records, key=lambda r: r.start):
        rows += rec.rows
        failures += rec.failures
        perturbed += rec.perturbed
        forwards += rec.forwards
        scored += rec.scored
    return rows, failures, perturbed, forwards, scored
