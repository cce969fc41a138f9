"""Free space for checkpoints: estimate a save's size, refuse one that cannot fit
(on every rank at once), and name ENOSPC, the path and the free space when a save
fails anyway (torch's zip writer reports a short write only as "unexpected pos")."""
from __future__ import annotations

import errno
import os
import shutil

from pipeline import distributed as dist

# Bytes per trainable element in the optimizer-state files: the fp32 master copy
# plus AdamW's two fp32 moments (DeepSpeed's ZeRO partitions them, one file per rank).
OPTIMIZER_BYTES_PER_TRAINABLE = 12
# Headers, client state, pickled metadata per rank file (measured: well under 1 MiB on the tiny model).
PER_RANK_OVERHEAD_BYTES = 1 << 20


class CheckpointSpaceError(OSError):
    """A checkpoint does not fit, or a save failed, on the checkpoint folder's file system."""


def estimate_checkpoint_bytes(local_numels: list[int], trainable_numels: list[int], param_bytes: int,
                              measured: int | None = None) -> int:
    """Bytes one checkpoint of this run takes, summed over the ranks.

    `measured`: the size of a complete checkpoint of this run (checkpoint_tags.newest_checkpoint_bytes),
    which is the estimate when known: the next one has the same tensors. Before that: each rank's
    partition of the parameters at `param_bytes` each, plus for its trainable
    ones the fp32 master copy and the two AdamW moments, plus a per-file overhead."""
    if measured:
        return measured
    return sum(n * param_bytes + t * OPTIMIZER_BYTES_PER_TRAINABLE + PER_RANK_OVERHEAD_BYTES
               for n, t in zip(local_numels, trainable_numels))


def free_bytes(path: str) -> int:
    """Free bytes (for this user) of the file system `path` is or will be on."""
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return shutil.disk_usage(path).free


def space_problem(ckpt_dir: str, estimate: int, margin: float) -> str | None:
    """Why a checkpoint of `estimate` bytes cannot be saved into `ckpt_dir`, or None."""
    if margin <= 0:
        return None
    free = free_bytes(ckpt_dir)
    needed = int(estimate * margin)
    if needed <= free:
        return None
    return (f"a checkpoint of this run needs about {_mib(estimate)} ({_mib(needed)} with "
            f"checkpoint.space_margin={margin:g}) but the file system of {ckpt_dir} has {_mib(free)} free")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def check_space_everywhere(ckpt_dir: str, estimate: int, margin: float, is_main: bool) -> None:
    """All ranks: rank 0 looks at the free space, every rank raises the same
    CheckpointSpaceError when the save cannot fit (a save refused on one rank
    only would leave the others waiting in its collectives)."""
    problem = space_problem(ckpt_dir, estimate, margin) if is_main else None
    problem = dist.broadcast_object(problem)
    if problem is not None:
        raise CheckpointSpaceError(errno.ENOSPC, f"refusing to start the checkpoint save: {problem}; free "
                                   f"space, point checkpoint.dir elsewhere or lower checkpoint.keep_last "
                                   f"(older checkpoints are kept until a new one is complete)")


def save_failure(exc: BaseException, path: str, estimate: int | None) -> CheckpointSpaceError:
    """The error of a failed save, naming the path, the free space and ENOSPC when
    the disk is the likely cause: torch's zip writer reports a short write only as
    `[enforce fail at inline_container.cc] . unexpected pos N vs M` (PyTorch's
    caffe2/serialize/inline_container.cc), without the OS error."""
    free = free_bytes(path)
    text = str(exc)
    space = (getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in text or "unexpected pos" in text
             or "file write failed" in text or (estimate is not None and free < estimate))
    cause = "No space left on device (ENOSPC)" if space else f"{type(exc).__name__}"
    return CheckpointSpaceError(errno.ENOSPC if space else errno.EIO,
                                f"saving checkpoint {path} failed: {cause}; {_mib(free)} free on its file "
                                f"system now; the newest complete checkpoint is untouched (no pruning "
                                f"happened). Error: {text[:500]}")
