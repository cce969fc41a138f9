"""What the user asked about: files, folders, globs and lists, as a lazy stream.

Every source expands to `Input`s in a fixed order (sources in the order given;
folders walked recursively with names sorted, hidden entries skipped; a glob's
matches sorted), numbered from 0. The stream is a generator, never a list, so a
run over millions of paths holds one folder's names at a time, and every loader
worker can walk it again and keep its own share (data.py). A source that names
nothing becomes an `Input` of kind "error" with the reason, so it reaches the
output as a record and the summary counts it:

    missing       no such file or folder
    empty_folder  a folder with no image or video file in it (or below it)
    no_match      a glob pattern that matches nothing

Inside folders only files with an image or video extension are taken (others
are counted as `ignored`); a file named explicitly is always tried, so an image
with an unusual extension is decoded by PIL rather than refused by its name.
"""
from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from sharding.eval_sets.video import VIDEO_EXTENSIONS
from sharding.schema import IMAGE_EXTENSIONS

INPUT_ERRORS: dict[str, str] = {
    "missing": "no such file or folder",
    "empty_folder": "no image or video file in this folder",
    "no_match": "the pattern matches no file",
}


@dataclass(frozen=True)
class Input:
    index: int
    """Position in the whole input stream."""
    path: str
    kind: str
    """"image", "video" or "error"."""
    error: str | None = None
    """For kind "error": a key of INPUT_ERRORS."""


@dataclass(frozen=True)
class Source:
    """One thing the user gave: a path/glob, or a text file listing paths."""

    value: str
    is_list: bool = False


def _ext(path: str) -> str:
    return path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""


def kind_of(path: str) -> str:
    return "video" if _ext(path) in VIDEO_EXTENSIONS else "image"


def is_media(path: str) -> bool:
    ext = _ext(path)
    return ext in IMAGE_EXTENSIONS or ext in VIDEO_EXTENSIONS


def walk_folder(root: str, ignored: list[int] | None = None) -> Iterator[str]:
    """Image and video files below `root`, depth first, names sorted, hidden entries skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if is_media(name):
                yield os.path.join(dirpath, name)
            elif ignored is not None:
                ignored[0] += 1


def _list_lines(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


def _expand(spec: str, ignored: list[int] | None) -> Iterator[tuple[str, str | None]]:
    """(path, error key or None) of one path, folder or glob."""
    if os.path.isfile(spec):
        yield spec, None
    elif os.path.isdir(spec):
        found = False
        for p in walk_folder(spec, ignored):
            found = True
            yield p, None
        if not found:
            yield spec, "empty_folder"
    elif glob.has_magic(spec):
        matches = sorted(glob.iglob(os.path.expanduser(spec), recursive=True))
        if not matches:
            yield spec, "no_match"
        for m in matches:
            if os.path.isdir(m):
                yield from _expand(m, ignored)
            elif os.path.isfile(m):
                yield m, None
    else:
        yield spec, "missing"


def iter_inputs(sources: Iterable[Source], ignored: list[int] | None = None) -> Iterator[Input]:
    """Every input of `sources`, numbered in order (see the module doc). `ignored`,
    when given, is a one-element list counting files skipped inside folders."""
    index = 0
    for src in sources:
        specs = _list_lines(src.value) if src.is_list else (src.value,)
        for spec in specs:
            for path, error in _expand(spec, ignored):
                yield Input(index, path, "error" if error else kind_of(path), error)
                index += 1
