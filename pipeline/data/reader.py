"""Reading raw samples (tar members grouped by key) at planned positions.

A sample is the run of consecutive tar members sharing a key (webdataset's
grouping: the member name up to the first dot of its basename). Samples that
the plan does not need are passed over without reading their bytes, which is
what makes a mid-epoch resume cheap; reading never decodes anything.
"""
from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from .plan import Ref

MAX_MEMBER_BYTES = 256 << 20
"""Largest tar member read into memory (DataConfig.max_member_bytes; the evaluation
uses this default). A tar header can declare 4 GB for one member, and each loader
worker would hold it whole; a larger member makes its sample a bad sample without
a byte of it being read. The sharder's images are far below it (its --max-pixels
caps a PNG near 500 MB only for pathological content)."""


class MemberTooLarge(ValueError):
    """A sample with a member above the size bound (the message names it)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass
class RawSample:
    """Undecoded bytes of one sample, or the reason it could not be read."""

    ref: Ref
    shard: str
    key: str | None = None
    members: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None


class _ShardReader:
    """Sequential reader of one shard, able to pass over samples cheaply."""

    def __init__(self, url: str, max_member_bytes: int = MAX_MEMBER_BYTES):
        self.url = url
        self.max_member_bytes = max_member_bytes
        if os.path.isfile(url):
            # Seekable mode: members we pass over are skipped with seek().
            self._tar = tarfile.open(url, mode="r:")
        else:
            self._stream = gopen(url)
            self._tar = tarfile.open(fileobj=self._stream, mode="r|*")
        self._members = iter(self._tar)
        self._group = -1
        self._prefix: str | None = None
        # First member of the next sample, met while finding where a sample ends. Its
        # bytes are read only when that sample is asked for: a damaged member then
        # costs its own sample, not the complete one before it, and a skipped
        # sample's first member is never read.
        self._look: tuple[int, str, str, tarfile.TarInfo] | None = None

    def read(self, index: int) -> tuple[str, dict[str, bytes]]:
        """Members of sample `index` (indices must increase between calls)."""
        if index < self._group or (index == self._group and self._look is None):
            raise RuntimeError(f"{self.url}: sample {index} requested after sample {self._group}")
        key: str | None = None
        sample: dict[str, bytes] = {}
        too_large: list[str] = []
        if self._look is not None:
            group, prefix, ext, member = self._look
            self._look = None
            if group == index:
                key = prefix
                self._take(member, ext, sample, too_large)
        for member in self._members:
            if not member.isfile():
                continue
            prefix, ext = base_plus_ext(member.name)
            if prefix is None:
                continue  # no extension: not a sample member (webdataset ignores these too)
            if prefix != self._prefix:
                self._group += 1
                self._prefix = prefix
            if self._group < index:
                continue
            if self._group > index:
                self._look = (self._group, prefix, ext, member)
                break
            key = prefix
            self._take(member, ext, sample, too_large)
        if key is None:
            raise EOFError(
                f"{self.url} holds only {self._group + 1} samples but sample {index} was "
                "expected (sizes.json disagrees with the shard)"
            )
        if too_large:
            raise MemberTooLarge(key, f"sample {key}: {', '.join(too_large)} > {self.max_member_bytes} bytes "
                                 "(data.max_member_bytes); not read")
        return key, sample

    def _take(self, member: tarfile.TarInfo, ext: str, sample: dict[str, bytes], too_large: list[str]) -> None:
        """Read one member into `sample`, unless it is over the size bound (then only named:
        the tar reader passes over its data without keeping it)."""
        if member.size > self.max_member_bytes:
            too_large.append(f"member .{ext} of {member.size} bytes")
        else:
            sample[ext] = self._tar.extractfile(member).read()

    def close(self) -> None:
        self._tar.close()
        stream = getattr(self, "_stream", None)
        if stream is not None:
            stream.close()


class ShardCursor:
    """Reads references in increasing stream position, one open shard at a time.

    A failure to open or read a shard makes every later reference of that
    visit a bad sample with the same reason (counted by the caller), instead of
    an exception that would end the worker.
    """

    def __init__(self, urls: tuple[str, ...] | list[str], max_member_bytes: int = MAX_MEMBER_BYTES):
        self._urls = urls
        self._max_member_bytes = max_member_bytes
        self._visit: int | None = None
        self._reader: _ShardReader | None = None
        self._failed: str | None = None

    def get(self, ref: Ref) -> RawSample:
        url = self._urls[ref.shard]
        if ref.visit != self._visit:
            self.close()
            self._visit, self._failed = ref.visit, None
            try:
                self._reader = _ShardReader(url, self._max_member_bytes)
            except Exception as e:  # noqa: BLE001 - any open failure is reported per sample
                self._failed = f"cannot open shard: {type(e).__name__}: {e}"
        if self._failed is not None:
            return RawSample(ref, url, error=self._failed)
        try:
            key, members = self._reader.read(ref.index)
        except MemberTooLarge as e:
            return RawSample(ref, url, key=e.key, error=str(e))
        except EOFError as e:
            return RawSample(ref, url, error=str(e))
        except Exception as e:  # noqa: BLE001 - a corrupt tar ends this visit, not the run
            self._failed = f"unreadable shard after sample {ref.index - 1}: {type(e).__name__}: {e}"
            return RawSample(ref, url, error=self._failed)
        return RawSample(ref, url, key=key, members=members)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
