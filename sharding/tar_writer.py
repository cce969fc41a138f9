"""Deterministic tar shard writing: one shard per call, fixed header fields.

A shard is a plain (uncompressed) tar in the webdataset layout: for each sample
the image member `<key>.<ext>` (original bytes) then `<key>.json` (metadata).
Every header field that could vary between machines or runs is fixed (mtime 0,
uid/gid 0, empty user/group names, mode 0o644, ustar format), so the same
samples always give the same bytes.

A shard is written under a temporary name in the same directory, flushed
(and fsync'ed when asked) and renamed over its final name: a reader (or a
rerun after a crash) never sees a partial shard under the final name.

`write_shard` is the unit of parallel work: it reads, validates and hashes
every image of one planned shard and returns a `ShardResult`; it runs in a
worker process, so everything it takes and returns is picklable.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from . import schema
from .images import BadImage, inspect_image, read_image_bytes

BLOCK = 512
# tarfile pads archives to a multiple of 20 blocks; doing the same keeps the
# shards indistinguishable from `tar`'s output for every tool.
RECORD = 20 * BLOCK
FIXED_MODE = 0o644
_ZEROS = bytes(BLOCK)


@dataclass
class ShardSample:
    """One sample to be written: an image plus its metadata.

    This is the writer's input type, shared by every dataset reader (MMFR,
    benchmark adapters). Exactly one of `path` and `data` gives the bytes.
    """

    key: str  # webdataset key (schema.sample_key(relpath)); unique in a shard set
    relpath: str  # dataset-relative path, "/"-separated; used in messages and metadata
    path: str | None  # absolute path of the image file, read by the worker
    metadata: dict[str, Any]  # every schema.METADATA_SCHEMA key except the byte-derived
    # ones (width, height, format, sha256, image_ext, schema), which the writer fills
    # in, and the OPTIONAL_METADATA_FIELDS, which it writes as null when absent
    size: int = 0  # expected byte size (from stat), used to plan shards by bytes
    data: bytes | None = None  # image bytes given directly instead of `path`
    fingerprint: str = ""  # anything that changes when the input changes (size,
    # mtime); recorded per shard so that a rerun rewrites shards whose inputs changed


@dataclass(frozen=True)
class Rejection:
    """An input that did not become a sample (or an input file with a problem)."""

    path: str  # dataset-relative path (or "file.json[index]" for a record)
    reason: str  # a short reason code, counted in the manifest
    detail: str = ""  # human-readable explanation
    kind: str = "image"  # "image" (counts in the reconciliation), "annotation", or "file"

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason, "detail": self.detail, "kind": self.kind}


@dataclass
class ShardJob:
    """A planned shard: where to write it and which samples, in order."""

    set_name: str  # shard set, e.g. "train" or "eval/flux"
    index: int  # shard number within its set
    path: str  # final path of the tar
    samples: list[ShardSample]
    max_pixels: int | None = None  # see images.inspect_image
    max_side: int | None = None  # see images.inspect_image
    max_aspect_ratio: float | None = None  # see images.inspect_image
    level: str = "structure"  # validation level, see images.LEVELS
    strict: bool = False  # raise on the first bad image instead of skipping it
    fsync: bool = False  # force the shard to disk before it is reported done


@dataclass
class ShardResult:
    """What a written shard holds, for the manifest and the resume record."""

    set_name: str
    index: int
    name: str  # file name of the shard, e.g. "shard-000000.tar"
    samples: int  # samples written
    bytes: int  # size of the tar file
    sha256: str  # hex digest of the tar file
    inputs: int  # samples planned for this shard (written + rejected)
    rejected: list[dict[str, str]] = field(default_factory=list)  # Rejection.to_dict()
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # label/generator/source counts
    fingerprint: str = ""  # hash of the planned inputs, see ShardSample.fingerprint

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardResult":
        return cls(**d)


class StrictError(Exception):
    """A bad input found under --strict; the message names the file and reason."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _header_tarfile(name: str, size: int) -> bytes:
    import tarfile  # only for the rare long name or huge member (keeps start-up short)

    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = FIXED_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    # PAX only when ustar cannot hold the name; with fixed fields it is as deterministic.
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


# The constant parts of a ustar header as tarfile builds them (mode, uid, gid,
# mtime, type, magic, empty user/group names, device numbers). Building it by
# hand is ~10x cheaper than tarfile.TarInfo.tobuf, which was a visible share
# of the sharder's time; a unit test checks the bytes equal tarfile's.
_FIXED_AFTER_NAME = b"0000644\0" + b"0000000\0" + b"0000000\0"
_FIXED_MTIME = b"00000000000\0"
_FIXED_TAIL = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * 64 + b"\0" * 16 + b"\0" * 155 + b"\0" * 12


def _header(name: str, size: int) -> bytes:
    """ustar header with the fixed fields; falls back to tarfile for long names/huge sizes."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or size >= 8 ** 11:
        return _header_tarfile(name, size)
    head = raw + b"\0" * (100 - len(raw)) + _FIXED_AFTER_NAME + b"%011o\0" % size + _FIXED_MTIME
    chksum = sum(head) + 8 * 32 + sum(_FIXED_TAIL)
    return head + b"%06o\0 " % chksum + _FIXED_TAIL


class TarWriter:
    """Streams members into a temporary file, hashing as it goes; `commit` renames.

    The shard's sha256 is computed from the bytes as they are written (never
    re-read). Small pieces (headers, padding, metadata) are joined so that a
    sample costs one or two write and hash calls, through a large buffer.
    """

    # Image payloads at least this big are written and hashed on their own
    # rather than copied into the joined block of the sample.
    JOIN_LIMIT = 1 << 16
    BUFFER = 1 << 20  # bytes of write buffer: one syscall per ~1 MiB of small samples

    def __init__(self, final_path: str, fsync: bool = False):
        self.final_path = final_path
        self.fsync = fsync
        self.tmp_path = f"{final_path}.tmp-{os.getpid()}"
        self._fh = open(self.tmp_path, "wb", buffering=self.BUFFER)
        self._sha = hashlib.sha256()
        self.size = 0

    def _write(self, b: bytes) -> None:
        self._fh.write(b)
        self._sha.update(b)
        self.size += len(b)

    def add(self, name: str, data: bytes) -> None:
        self.add_members(((name, data),))

    def add_members(self, members) -> None:
        """Append (name, bytes) members in order (a sample: image, then json)."""
        parts: list[bytes] = []
        for name, data in members:
            parts.append(_header(name, len(data)))
            if len(data) >= self.JOIN_LIMIT:
                self._write(b"".join(parts))
                self._write(data)
                parts = []
            else:
                parts.append(data)
            pad = -len(data) % BLOCK
            if pad:
                parts.append(_ZEROS[:pad])
        if parts:
            self._write(b"".join(parts))

    def commit(self) -> str:
        """Finish the archive, make it visible under its final name; returns its sha256.

        The rename makes the shard appear complete or not at all, which is all
        that a killed process needs. With `fsync`, the data and the rename are
        also forced to disk (power-loss durability; costs a full flush).
        """
        end = 2 * BLOCK
        self._write(bytes(end + (-(self.size + end) % RECORD)))
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp_path, self.final_path)
        if self.fsync:
            _fsync_dir(os.path.dirname(self.final_path) or ".")
        return self._sha.hexdigest()

    def abort(self) -> None:
        self._fh.close()
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def image_ext(relpath: str) -> str:
    """The member extension for an image: its on-disk extension, lower-cased."""
    base = relpath.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


# One encoder for every sample: json.dumps with non-default options builds a
# new JSONEncoder per call. Same options, same output as json.dumps.
_METADATA_ENCODER = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def metadata_json(meta: dict[str, Any]) -> bytes:
    """Serialise sample metadata deterministically (sorted keys, UTF-8)."""
    return _METADATA_ENCODER.encode(meta).encode("utf-8")


def jobs_fingerprint(samples: list[ShardSample]) -> str:
    """Hash of what a shard is made from (keys, input fingerprints, metadata).

    repr() of the metadata is deterministic for the same reader output and much
    cheaper than JSON; this runs for every sample on every (re)run.
    """
    h = hashlib.sha256()
    # The schema version shapes the json written from the same metadata, so a
    # rerun after a schema change rewrites the shards instead of reusing them.
    h.update(f"schema {schema.SCHEMA_VERSION}\0".encode("utf-8"))
    for s in samples:
        h.update(f"{s.key}\0{s.relpath}\0{s.fingerprint}\0{s.metadata!r}\0".encode("utf-8"))
        if s.data is not None:
            h.update(hashlib.sha256(s.data).digest())
    return h.hexdigest()


def _count(counts: dict[str, dict[str, int]], group: str, value: Any) -> None:
    bucket = counts.setdefault(group, {})
    bucket[str(value)] = bucket.get(str(value), 0) + 1


def write_shard(job: ShardJob) -> ShardResult:
    """Read, validate and write one planned shard; returns what was written.

    Bad images are skipped and reported in `ShardResult.rejected` (or raise
    StrictError under `job.strict`). The tar is written atomically.
    """
    writer = TarWriter(job.path, job.fsync)
    rejected: list[dict[str, str]] = []
    counts: dict[str, dict[str, int]] = {}
    written = 0
    sha256 = hashlib.sha256
    try:
        for s in job.samples:
            try:
                data = s.data if s.data is not None else read_image_bytes(s.path or "")
                info = inspect_image(data, job.max_pixels, job.level, job.max_side, job.max_aspect_ratio)
            except BadImage as exc:
                if job.strict:
                    raise StrictError(f"{s.path or s.relpath}: {exc.reason}: {exc.detail}") from None
                rejected.append(Rejection(s.relpath, exc.reason, exc.detail).to_dict())
                continue
            ext = image_ext(s.relpath)
            meta = dict.fromkeys(schema.OPTIONAL_METADATA_FIELDS)  # present, null unless given
            meta.update(s.metadata)
            meta.update(width=info.width, height=info.height, format=info.format,
                        sha256=sha256(data).hexdigest(), image_ext=ext,
                        schema=schema.SCHEMA_VERSION)
            problems = schema.metadata_problems(meta)
            if problems:  # a reader's bug, not a bad input: stop, naming the sample
                raise ValueError(f"sample {s.relpath}: " + "; ".join(problems))
            writer.add_members(((f"{s.key}.{ext}", data), (f"{s.key}.json", metadata_json(meta))))
            written += 1
            for group in ("label", "generator", "source", "split"):
                _count(counts, group, meta[group])
            _count(counts, "generator_label", f"{meta['generator']}:{meta['label']}")
        sha = writer.commit()
    except BaseException:
        writer.abort()
        raise
    return ShardResult(set_name=job.set_name, index=job.index, name=os.path.basename(job.path),
                       samples=written, bytes=writer.size, sha256=sha, inputs=len(job.samples),
                       rejected=rejected, counts=counts, fingerprint=jobs_fingerprint(job.samples))
