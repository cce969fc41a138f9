"""Who may have written a checkpoint, and whether its files are the ones saved.

DeepSpeed unpickles its optimizer state (`torch.load(weights_only=False)`), so
before a resume loads anything every file of the tag is checked against the
size and sha256 its COMPLETE marker lists (`verify_files`): a file swapped
after the save is refused, naming it. A checkpoint folder that another user
owns or that group or others may write is refused as well (`check_trusted`:
anyone who can write there can make the next resume run their code) unless
`checkpoint.trust_foreign=true`; rank 0 removes group/other write permission
from every tag it completes (`drop_group_other_write`), so a run's own
checkpoints always pass.
"""
from __future__ import annotations

import json
import os
import stat

from pipeline.training.checkpoint_tags import COMPLETE


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


def drop_group_other_write(ckpt_dir: str, tag_dir: str) -> None:
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
