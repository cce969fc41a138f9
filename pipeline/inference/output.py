"""Prediction records on disk: formats, the per-rank journal, resuming, the final file.

Records are dicts (one per input; a video's frames are inside its record).
With `--out FILE` every rank appends its records, as each run of inputs
finishes, to its own journal `FILE.partial/<attempt>-rank<R>.jsonl` (fsync'd,
so a kill loses at most the run in flight); at the end rank 0 writes FILE:
the records FILE already had, then every journal's records (each journal in
input order, ranks merged by input position), in FILE's format, to a temporary
file in the same folder that replaces FILE atomically (common.atomic_files), and
removes the journals.

Resuming: a scored record is keyed by the content sha256 of its input and the
`settings_id` of the run (checkpoint files' names, sizes and modification
times, protocol, generation settings, seed, threshold, mode, dtype,
quantization, evidence, video sampling). A rerun reads FILE and the journals
and skips every input whose hash has a scored record with its settings_id;
error records are not kept as done: their inputs are tried again, and the old
error record is dropped when the new attempt writes one for the same path.
--restart ignores both and replaces FILE.

Formats: jsonl (every field), csv (one row per input; nested fields, such as a
video's frames, the sections and the evidence, as JSON text in their column),
text (a readable block per input; not resumable).
"""
from __future__ import annotations

import csv
import hashlib
import heapq
import io
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from common.atomic_files import atomic_writer, remove_tree

CSV_COLUMNS: tuple[str, ...] = (
    "index", "path", "kind", "status", "reason", "verdict", "p_fake", "threshold", "mode",
    "answer_verdict", "disagree", "parse_status", "summary", "caption", "reasoning", "conclusion",
    "answer", "width", "height", "n_frames", "frames", "evidence", "sha256", "settings_id",
)
_SECTIONS = ("summary", "caption", "reasoning", "conclusion")


def settings_id(checkpoint: str, settings: dict[str, Any]) -> str:
    """Short hash of the checkpoint's weight files (name, size, mtime) and the settings.

    File statistics rather than a content hash: hashing 26 GB of weights to key a
    prediction of one image would take longer than the prediction (the eval hashes
    them, since its report must say which weights it scored)."""
    from pipeline.evaluation.report import WEIGHT_SUFFIXES

    root = os.path.abspath(checkpoint)
    files = []
    for dirpath, _dirs, names in os.walk(root):
        for name in sorted(names):
            if name.endswith(WEIGHT_SUFFIXES) or name == "config.json":
                st = os.stat(os.path.join(dirpath, name))
                files.append((os.path.relpath(os.path.join(dirpath, name), root), st.st_size, st.st_mtime_ns))
    text = json.dumps({"checkpoint": sorted(files), "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- formats
def _csv_row(rec: dict[str, Any]) -> dict[str, Any]:
    row = {k: rec.get(k) for k in CSV_COLUMNS}
    sections = rec.get("sections") or {}
    for s in _SECTIONS:
        row[s] = sections.get(s)
    for k in ("frames", "evidence"):
        if rec.get(k) is not None:
            row[k] = json.dumps(rec[k], sort_keys=True)
    return {k: "" if v is None else v for k, v in row.items()}


def text_block(rec: dict[str, Any]) -> str:
    """A readable block for one record (the default on a terminal)."""
    if rec["status"] != "ok":
        return f"{rec['path']}: ERROR {rec.get('reason', '')}\n"
    p = rec.get("p_fake")
    head = (f"{rec['path']}: {str(rec.get('verdict') or 'n/a').upper()}  "
            f"p(fake)={'n/a' if p is None else f'{p:.3f}'} (threshold {rec['threshold']:.2f})")
    lines = [head]
    if rec.get("kind") == "video":
        lines[0] += f"  video, mean of {rec['n_frames']} frames"
        for f in rec["frames"]:
            fp = f.get("p_fake")
            lines.append(f"  frame {f['frame']}: {str(f.get('verdict') or 'n/a')} "
                         f"p(fake)={'n/a' if fp is None else f'{fp:.3f}'}")
    elif rec.get("mode") == "detect_only":
        lines.append("  (detect-only: no reasoning generated)")
    else:
        sections = rec.get("sections") or {}
        for s in _SECTIONS:
            if sections.get(s):
                lines.append(f"  {s}: {sections[s]}")
        if not any(sections.get(s) for s in _SECTIONS) and rec.get("answer"):
            lines.append(f"  answer: {rec['answer']}")
        lines.append(f"  parse: {rec.get('parse_status')}")
        if rec.get("disagree"):
            lines.append(f"  [!] the written conclusion says {rec['answer_verdict']}, p(fake) says {rec['verdict']}")
    ev = rec.get("evidence")
    if ev:
        lines.append(f"  evidence: {ev['png']}")
    return "\n".join(lines) + "\n"


class RecordWriter:
    """Writes records to a text stream in one format (csv writes its header first)."""

    def __init__(self, stream: TextIO, fmt: str):
        self.stream, self.fmt = stream, fmt
        self._csv = None
        if fmt == "csv":
            self._csv = csv.DictWriter(stream, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
            self._csv.writeheader()

    def write(self, rec: dict[str, Any]) -> None:
        if self.fmt == "jsonl":
            self.stream.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
        elif self.fmt == "csv":
            self._csv.writerow(_csv_row(rec))
        else:
            self.stream.write(text_block(rec) + "\n")


def read_records(path: str, fmt: str) -> Iterator[dict[str, Any]]:
    """Records of an output file in jsonl or csv (a torn last line is skipped: the
    run that wrote it was killed mid-write, and its input is predicted again)."""
    with open(path, encoding="utf-8", newline="") as fh:
        if fmt == "csv":
            for row in csv.DictReader(fh):
                yield dict(row)
            return
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


# ---------------------------------------------------------------------- journal and resume
def journal_dir(out: str) -> Path:
    return Path(f"{out}.partial")


class Journal:
    """One rank's journal of finished records (jsonl, fsync'd after each run of inputs)."""

    def __init__(self, out: str, attempt: str, rank: int):
        d = journal_dir(out)
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / f"{attempt}-rank{rank:05d}.jsonl"
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        for rec in records:
            self._fh.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def new_attempt() -> str:
    """Journal file prefix of this run: sortable by start time, unique."""
    import time

    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"


def done_hashes(out: str, fmt: str, sid: str) -> set[str]:
    """Content hashes already predicted with settings `sid`, in `out` or its journals."""
    done: set[str] = set()
    sources = [(out, fmt)] if os.path.isfile(out) else []
    sources += [(str(p), "jsonl") for p in sorted(journal_dir(out).glob("*.jsonl"))]
    for path, f in sources:
        for rec in read_records(path, f):
            if rec.get("status") == "ok" and rec.get("settings_id") == sid and rec.get("sha256"):
                done.add(rec["sha256"])
    return done


def _journal_records(out: str) -> Iterator[dict[str, Any]]:
    """Every journal's records: attempts in start order, an attempt's ranks merged by index."""
    files = sorted(journal_dir(out).glob("*.jsonl"))
    attempts: dict[str, list[Path]] = {}
    for p in files:
        attempts.setdefault(p.name.rsplit("-rank", 1)[0], []).append(p)
    for name in sorted(attempts):
        streams = [read_records(str(p), "jsonl") for p in attempts[name]]
        yield from heapq.merge(*streams, key=lambda r: int(r.get("index", 0)))


def finalize(out: str, fmt: str, restart: bool) -> int:
    """Write `out` from its old records and the journals (module doc); returns the
    number of records written. Bounded memory: records are streamed; only the
    paths and keys of new records are held to drop what they supersede."""
    new_keys: set[tuple[str, str]] = set()
    new_paths: set[str] = set()
    for rec in _journal_records(out):
        new_paths.add(rec.get("path", ""))
        if rec.get("status") == "ok":
            new_keys.add((rec.get("sha256"), rec.get("settings_id")))
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    seen: set[tuple[str, str]] = set()
    with atomic_writer(out) as fh:  # a temporary beside `out`, fsync'd, os.replace'd; never through a link
        writer = RecordWriter(fh, fmt)
        if target.is_file() and not restart:
            for rec in read_records(out, fmt):
                key = (rec.get("sha256"), rec.get("settings_id"))
                if rec.get("status") == "ok":
                    if key in seen:
                        continue
                    seen.add(key)
                elif rec.get("path") in new_paths:
                    continue  # an old error for an input tried again in this run
                writer.write(_from_csv(rec) if fmt == "csv" else rec)
                written += 1
        for rec in _journal_records(out):
            key = (rec.get("sha256"), rec.get("settings_id"))
            if rec.get("status") == "ok":
                if key in seen:
                    continue  # written by a killed finalize, or twice by a killed run
                seen.add(key)
            writer.write(rec)
            written += 1
    remove_journal(out)
    return written


def remove_journal(out: str) -> None:
    """Delete `out`'s journal folder (refusing a symbolic link in its place)."""
    if journal_dir(out).exists() or journal_dir(out).is_symlink():
        remove_tree(journal_dir(out))


def _from_csv(row: dict[str, Any]) -> dict[str, Any]:
    """A csv row read back, with its JSON columns and sections restored for rewriting."""
    rec: dict[str, Any] = {k: (None if v == "" else v) for k, v in row.items()}
    for k in ("frames", "evidence"):
        if rec.get(k):
            rec[k] = json.loads(rec[k])
    rec["sections"] = {s: rec.pop(s, None) for s in _SECTIONS}
    return rec


def render(records: Iterable[dict[str, Any]], fmt: str) -> str:
    """Records formatted as one string (tests, the demo's printout)."""
    buf = io.StringIO()
    w = RecordWriter(buf, fmt)
    for r in records:
        w.write(r)
    return buf.getvalue()
