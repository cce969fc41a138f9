"""Writing files and folders so that a reader (or a crash) sees the old or the new
content, never a mix, and never through a symbolic link.

The one way this project writes a file under a run, checkpoint, export or
results folder:

- `write_atomic(path, data)` / `atomic_writer(path)`: a temporary file made by
  `mkstemp` in the target's folder (an unpredictable name, created with
  O_EXCL, so a link planted at a guessable name is never opened), written,
  fsync'd, given its permissions, then `os.replace`d onto the final name.
  A rename replaces a symbolic link at the final name instead of writing
  through it, so a link planted there cannot redirect the write.
- `replace_dir(new, final)`: a folder built beside its final name is swapped in;
  the old one is deleted only once the new one is in place.
- `remove_tree(path)`: refuses a symbolic link instead of deleting what it
  points at (`RefusedLink`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from typing import IO, Iterator

FILE_MODE = 0o644
"""Permissions of a file written here unless the caller asks for others (secrets: 0o600)."""


class RefusedLink(OSError):
    """A path that had to be a real file or folder is a symbolic link (the message names it)."""


def plain_file_name(name: object, source: str) -> str:
    """`name` when it is a plain file name (no folder part, not "." or ".."), to be joined
    to a folder; ValueError naming `source` otherwise. Names read from files (sizes.json,
    weight indexes, manifests) go through it, so that a crafted one cannot reach
    `../../elsewhere` or an absolute path."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name):
        raise ValueError(f"{source}: {name!r} is not a plain file name (no '/', '..' or empty names)")
    return name


def fsync_dir(folder: str) -> None:
    """Make a rename or a new name in `folder` durable (its directory entry)."""
    fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w", *, perm: int = FILE_MODE, fsync: bool = True,
                  encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path`.

    mode: "w" (text, `encoding`) or "wb". An exception inside the block removes
    the temporary file and leaves `path` as it was."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_writer: mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=encoding if mode == "w" else None) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), perm)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(folder)


def write_atomic(path: str | os.PathLike, data: str | bytes, *, perm: int = FILE_MODE, fsync: bool = True) -> None:
    """Write `data` (text as UTF-8) to `path` through `atomic_writer`."""
    with atomic_writer(path, "wb" if isinstance(data, bytes) else "w", perm=perm, fsync=fsync) as fh:
        fh.write(data)


def is_link(path: str | os.PathLike) -> bool:
    """True when `path` itself is a symbolic link (whatever it points at, if anything)."""
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def remove_tree(path: str | os.PathLike) -> None:
    """Delete the folder `path` and everything in it; raise RefusedLink when `path`
    is a symbolic link (links inside it are removed, never followed: shutil.rmtree)."""
    if is_link(path):
        raise RefusedLink(f"{os.fspath(path)}: a symbolic link; refusing to delete through it")
    shutil.rmtree(path)


def new_dir_beside(final: str | os.PathLike) -> str:
    """An empty, uniquely named folder next to `final`, to be built then `replace_dir`'d in."""
    final = os.fspath(final)
    parent = os.path.dirname(final) or "."
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(final)}.new-")


def replace_dir(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the complete folder `new` at `final`, then delete the folder it replaces.

    Until the first rename `final` is the old folder, after the second it is the
    new one; a crash between the two leaves both beside it (`.NAME.old-*`,
    `.NAME.new-*`), never a half-deleted folder. A symbolic link at `final` is
    refused (RefusedLink), not followed."""
    new, final = os.fspath(new), os.fspath(final)
    if is_link(final):
        raise RefusedLink(f"{final}: a symbolic link; refusing to replace what it points at")
    parent = os.path.dirname(final) or "."
    old = None
    if os.path.isdir(final):
        old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(final)}.old-")
        os.rmdir(old)  # only the unique name is wanted; the rename below creates it
        os.rename(final, old)
    os.rename(new, final)
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old)
