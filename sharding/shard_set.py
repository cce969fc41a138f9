"""Planning, parallel writing and resumption of shard sets (dataset-independent).

Any dataset reader that produces `ShardSample`s can reuse this module:
`write_shard_set` for one set, `write_shard_sets` for several sharing one
worker pool. The MMFR CLI (`shard_mmfr.py`) is one such user.

How determinism and resumption work:
* The assignment of samples to shards is decided up front from the sample
  list alone (seeded interleave, limits on count and estimated bytes), so the
  output does not depend on the number of workers or on the order in which
  workers finish. Each worker writes whole shards.
* Every finished shard gets a record `OUT/.sharder/<set>/shard-NNNNNN.json`
  (its sha256, size, counts and a fingerprint of its planned inputs), written
  after the tar is durable under its final name. A rerun skips a shard whose
  record matches the plan and whose tar re-hashes to the recorded sha256; any
  other shard is rewritten (to the same bytes). Temporary files of a killed
  run are removed on start.
* The options that shape the output are recorded in `OUT/.sharder/arguments.json`;
  a rerun with different ones into the same OUT is refused.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from . import manifest as mf
from .dir_lock import LOCK_FILE, DirLock, OutputLocked  # noqa: F401 - OutputLocked is re-exported
from .dir_lock import acquire as acquire_dir_lock
from .images import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_SIDE
from .tar_writer import (BLOCK, Rejection, ShardJob, ShardResult, ShardSample, jobs_fingerprint,
                         shard_name, write_shard)
from .worker_pool import start_pool

STATE_DIR = ".sharder"


@dataclass(frozen=True)
class ShardOptions:
    """Options of a sharding run; `output_arguments()` are the ones recorded."""

    max_samples_per_shard: int = 1000  # samples per shard at most
    max_bytes_per_shard: int = 1 << 30  # estimated tar bytes per shard at most (a single
    # larger sample still gets its own shard)
    seed: int = 0  # seed of the interleaving permutation
    interleave: bool = True  # mix labels and sources across shards (seeded); else keep input order
    max_pixels: int | None = 178_956_970  # reject images with more pixels (PIL's bomb limit x2)
    max_side: int | None = DEFAULT_MAX_SIDE  # reject images with a longer side (images.size_problem)
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO  # reject images more elongated than this
    validation: str = "structure"  # images.LEVELS: "header", "structure" or "decode"
    strict: bool = False  # stop at the first bad input instead of skipping it
    plan_ranks: int = 1  # ranks (nodes x GPUs) of the biggest planned job
    plan_workers: int = 1  # data loader workers per rank of that job
    workers: int = 1  # writer processes; does not change the output
    progress: bool = True  # show a tqdm progress bar
    fsync: bool = False  # fsync every shard (power-loss durability); kill -9 safety needs no
    # fsync: shards appear by atomic rename and a rerun re-hashes them against their records

    def output_arguments(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("workers", "progress", "fsync"):
            d.pop(k)
        return d


class OptionsMismatch(Exception):
    """OUT_DIR was written by a run with different options."""


@dataclass
class SetSpec:
    """One shard set to write: its candidate samples and the reader's rejections."""

    samples: list[ShardSample]
    rejected: list[Rejection] = field(default_factory=list)


@dataclass
class RunSummary:
    """Outcome of `write_shard_sets`."""

    manifests: dict[str, dict[str, Any]]  # set name -> manifest
    seconds: float
    shards_written: int  # shards written by this run (the rest were complete already)
    shards_reused: int


def estimate_bytes(s: ShardSample) -> int:
    """Tar bytes a sample will take: two headers, padded image and metadata (approximate)."""
    size = len(s.data) if s.data is not None else s.size
    meta = _approx_len(s.metadata) + 200  # + the byte-derived fields
    return 2 * BLOCK + size + (-size % BLOCK) + meta + (-meta % BLOCK)


def _approx_len(obj: Any) -> int:
    """Rough JSON length of metadata (cheaper than serialising it).

    The exact-type branches are a fast path (strings inline, no recursion for
    them) giving the same numbers as the isinstance rules below, which the
    plan depends on: a changed estimate would move shard boundaries.
    """
    t = type(obj)
    if t is str:
        return len(obj) + 3
    if t is dict:
        n = 2
        for k, v in obj.items():
            n += len(k) + 4 + (len(v) + 3 if type(v) is str else _approx_len(v))
        return n
    if t is list:
        n = 2
        for v in obj:
            n += (len(v) + 4 if type(v) is str else _approx_len(v) + 1)
        return n
    if isinstance(obj, str):
        return len(obj) + 3
    if isinstance(obj, dict):
        return sum(len(k) + 4 + _approx_len(v) for k, v in obj.items()) + 2
    if isinstance(obj, (list, tuple)):
        return sum(_approx_len(v) + 1 for v in obj) + 2
    return 8


def interleave(samples: Sequence[ShardSample], seed: int, set_name: str) -> list[ShardSample]:
    """Seeded permutation that spreads every (label, source) group evenly.

    Each group is shuffled with its own seeded generator, then the groups are
    merged by their relative position, so any window of the result holds every
    group in proportion: no shard is single-label when both labels exist.
    """
    groups: dict[tuple[str, str], list[ShardSample]] = {}
    for s in samples:
        g = (str(s.metadata.get("label")), str(s.metadata.get("source")))
        groups.setdefault(g, []).append(s)
    keyed = []
    for gi, g in enumerate(sorted(groups)):
        members = sorted(groups[g], key=lambda s: s.relpath)
        random.Random(f"{seed}/{set_name}/{g[0]}/{g[1]}").shuffle(members)
        n = len(members)
        keyed.extend(((j + 0.5) / n, gi, s) for j, s in enumerate(members))
    keyed.sort(key=lambda t: (t[0], t[1]))
    return [t[2] for t in keyed]


def plan_set(set_name: str, samples: Sequence[ShardSample], opts: ShardOptions) -> list[list[ShardSample]]:
    """Cut a set's samples into shards (after interleaving), deterministically."""
    ordered = interleave(samples, opts.seed, set_name) if opts.interleave else list(samples)
    shards: list[list[ShardSample]] = []
    cur: list[ShardSample] = []
    cur_bytes = 0
    for s in ordered:
        b = estimate_bytes(s)
        if cur and (len(cur) >= opts.max_samples_per_shard or cur_bytes + b > opts.max_bytes_per_shard):
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(s)
        cur_bytes += b
    if cur:
        shards.append(cur)
    if opts.interleave:
        for i, shard in enumerate(shards):
            random.Random(f"{opts.seed}/{set_name}/shard/{i}").shuffle(shard)
    return shards


def plan_warnings(set_name: str, shards: list[list[ShardSample]], opts: ShardOptions) -> list[str]:
    out = []
    slots = opts.plan_ranks * opts.plan_workers
    if len(shards) < slots:
        out.append(f"{set_name}: {len(shards)} shard(s) < --plan-ranks x --plan-workers = {slots}; "
                   f"some loader workers will get no shard of their own (use smaller shards)")
    labels_all = {s.metadata.get("label") for sh in shards for s in sh}
    if len(labels_all) > 1:
        for i, sh in enumerate(shards):
            if len({s.metadata.get("label") for s in sh}) == 1:
                out.append(f"{set_name}: {shard_name(i)} holds a single label")
    return out


def file_digest(path: str, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks (shards, weights, listed images)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _reusable(job: ShardJob, record_path: str) -> ShardResult | None:
    """The recorded result of a shard if it is complete and matches the plan."""
    try:
        with open(record_path, encoding="utf-8") as fh:
            res = ShardResult.from_dict(json.load(fh))
        # Computed here only when a record exists; fresh shards get theirs in the worker.
        if res.fingerprint != jobs_fingerprint(job.samples):
            return None
        if os.path.getsize(job.path) != res.bytes or file_digest(job.path) != res.sha256:
            return None
        return res
    except (OSError, ValueError, TypeError):
        return None


def _check_arguments(state: str, arguments: dict[str, Any]) -> None:
    path = os.path.join(state, "arguments.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
        if old != arguments:
            diff = sorted(k for k in set(old) | set(arguments) if old.get(k) != arguments.get(k))
            details = "; ".join(f"{k}: was {old.get(k)!r}, now {arguments.get(k)!r}" for k in diff)
            raise OptionsMismatch(f"{os.path.dirname(state)} was written with different options ({details}); "
                                  f"rerun with the same options to resume, or use a new output directory")
        return
    mf.write_atomic(path, mf.dumps(arguments))


def _lock(state: str) -> DirLock:
    # A lock file naming its holder (dir_lock), not an flock: it also holds across the
    # nodes of a shared file system, and a killed run's lock is taken over with a warning.
    return acquire_dir_lock(os.path.join(state, LOCK_FILE), "sharder")


def write_shard_sets(sets: dict[str, SetSpec], out_root: str, opts: ShardOptions,
                     arguments: dict[str, Any] | None = None) -> RunSummary:
    """Write several shard sets under `out_root/<set name>/`, resumably; see the module doc.

    `arguments` (default: the output-shaping options) is recorded in every
    manifest and in `out_root/.sharder/arguments.json`. Returns a RunSummary;
    raises OptionsMismatch, OutputLocked or (under opts.strict) StrictError.
    """
    t0 = time.perf_counter()
    arguments = dict(arguments if arguments is not None else opts.output_arguments())
    state = os.path.join(out_root, STATE_DIR)
    os.makedirs(state, exist_ok=True)
    lock = _lock(state)
    try:
        _check_arguments(state, arguments)
        jobs: list[ShardJob] = []
        warnings: dict[str, list[str]] = {}
        for set_name, spec in sets.items():
            set_dir = os.path.join(out_root, set_name)
            os.makedirs(set_dir, exist_ok=True)
            os.makedirs(os.path.join(state, set_name), exist_ok=True)
            for stale in glob.glob(os.path.join(glob.escape(set_dir), "*.tmp-*")):
                os.unlink(stale)  # a killed run's partial files, never under a final name
            shards = plan_set(set_name, spec.samples, opts)
            assert sum(len(s) for s in shards) == len(spec.samples)
            warnings[set_name] = plan_warnings(set_name, shards, opts)
            planned = {shard_name(i) for i in range(len(shards))}
            for old in glob.glob(os.path.join(glob.escape(set_dir), "shard-*.tar")):
                if os.path.basename(old) not in planned:
                    os.unlink(old)  # left by an earlier run on an input that has since shrunk
            jobs.extend(ShardJob(set_name, i, os.path.join(set_dir, shard_name(i)), sh,
                                 opts.max_pixels, opts.max_side, opts.max_aspect_ratio, opts.validation,
                                 opts.strict, opts.fsync)
                        for i, sh in enumerate(shards))
        results: dict[tuple[str, int], ShardResult] = {}
        todo = []
        for job in jobs:
            res = _reusable(job, _record_path(state, job))
            if res is not None:
                results[(job.set_name, job.index)] = res
            else:
                todo.append(job)
        reused = len(results)
        _run_jobs(todo, state, opts, results)
        manifests = {}
        for set_name, spec in sets.items():
            set_results = [r for (s, _), r in results.items() if s == set_name]
            m = mf.build_manifest(set_name, set_results, spec.rejected, arguments, warnings[set_name])
            mf.write_manifest(os.path.join(out_root, set_name), m, opts.fsync)
            manifests[set_name] = m
    finally:
        lock.release()
    return RunSummary(manifests, time.perf_counter() - t0, len(todo), reused)


def _record_path(state: str, job: ShardJob) -> str:
    return os.path.join(state, job.set_name, shard_name(job.index).replace(".tar", ".json"))


# Jobs of the current pool, inherited by forked workers, which then receive
# only an index: pickling every job's samples (metadata with all the
# conversations) through the pool's pipe cost as much as writing them.
_FORKED_JOBS: list[ShardJob] = []


def _write_forked(i: int) -> ShardResult:
    return write_shard(_FORKED_JOBS[i])


def _run_jobs(todo: list[ShardJob], state: str, opts: ShardOptions,
              results: dict[tuple[str, int], ShardResult]) -> None:
    # Biggest shards first, so that the last worker to finish is not left
    # with one large shard while the others idle.
    todo = sorted(todo, key=lambda j: -sum(s.size for s in j.samples))
    total = sum(len(j.samples) for j in todo)
    parallel = opts.workers > 1 and len(todo) > 1
    pool, fn, items = None, write_shard, todo
    bar = None
    try:
        if parallel:
            import multiprocessing as mp  # only a parallel run needs it

            if "fork" in mp.get_all_start_methods():
                # fork: workers start in milliseconds with everything imported
                # and the plan in memory (spawn/forkserver would re-import and
                # unpickle it). The pool starts before the progress bar, whose
                # monitor thread must not be running when the process forks.
                _FORKED_JOBS[:] = todo
                ctx, fn, items = mp.get_context("fork"), _write_forked, range(len(todo))
            else:
                ctx = mp.get_context()
            pool = start_pool(ctx, min(opts.workers, len(todo)))
        if opts.progress and total:
            from tqdm import tqdm  # imported only when shown: a visible share of start-up

            bar = tqdm(total=total, unit="img", desc="sharding", dynamic_ncols=True)
        by_key = {(j.set_name, j.index): j for j in todo}
        outcomes = pool.imap_unordered(fn, items, chunksize=1) if pool is not None else map(fn, items)
        for res in outcomes:
            key = (res.set_name, res.index)
            mf.write_atomic(_record_path(state, by_key[key]), mf.dumps(res.to_dict()), opts.fsync)
            results[key] = res
            if bar is not None:
                bar.update(res.inputs)
    finally:
        if pool is not None:
            pool.terminate()  # what `with Pool` does on exit; all results are in by now
            pool.join()
        _FORKED_JOBS.clear()
        if bar is not None:
            bar.close()


def write_shard_set(samples: Sequence[ShardSample], out_dir: str, opts: ShardOptions,
                    rejected: Sequence[Rejection] = (), set_name: str = ".",
                    arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write one shard set into `out_dir` and return its manifest.

    `samples`: ShardSample(key, relpath, path or data, metadata, size) each, in
    a deterministic order; metadata must hold every schema.METADATA_FIELDS
    entry except width, height, format, sha256, image_ext and schema, which the
    writer computes from the bytes. `rejected`: the reader's rejections, listed
    in the manifest. Shards go to `out_dir/shard-NNNNNN.tar` with
    `manifest.json` and `sizes.json`; the run is resumable and deterministic
    (see the module doc). Use `write_shard_sets` to write several sets with
    one worker pool.
    """
    summary = write_shard_sets({set_name: SetSpec(list(samples), list(rejected))}, out_dir, opts, arguments)
    return summary.manifests[set_name]
