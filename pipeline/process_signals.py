"""The stop signals and the signal mask, shared by the training entry point
(pipeline/training/preemption.py) and the loader workers it forks
(pipeline/data/stream.py), which inherit its mask.

The training entry point blocks STOP_SIGNALS before torch starts any thread, so
that only preemption's waiting thread receives them; every process forked or
exec'd from a rank inherits that mask (a mask survives exec). Code that starts
such processes must make sure they can still be ended: see
`exit_on_the_parents_sigterm` here and sharding/worker_pool.py.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Iterable

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
"""The signals a scheduler or a user sends to stop a run: SIGTERM (scancel, the
launcher, kill), SIGINT (Ctrl-C), SIGUSR1 (SLURM's `--signal` warning)."""


def signal_numbers(names: Iterable[str]) -> set[int]:
    return {int(signal.Signals[n]) for n in names}


def block_signals(names: Iterable[str] = STOP_SIGNALS) -> set[int]:
    """Block `names` in the calling thread and return the previous mask; threads
    and processes it starts later inherit the mask."""
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, signal_numbers(names)))


def restore_signal_mask(previous: Iterable[int]) -> None:
    """Set the calling thread's mask back to `previous` (block_signals' result)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set(previous))


def exit_on_the_parents_sigterm() -> None:
    """For a worker process forked by a rank that blocks the stop signals.

    The worker inherits the mask, so a SIGTERM to the process group cannot kill
    it in the middle of the rank's checkpoint. The rank itself must still be
    able to end it: torch's loader shutdown and multiprocessing's exit handler
    SIGTERM their workers and wait for them, and would wait forever. So a
    thread takes the blocked stop signals and exits on a SIGTERM sent by the
    parent; the others are dropped. Without SIGTERM blocked it does nothing."""
    mine = signal_numbers(STOP_SIGNALS) & set(signal.pthread_sigmask(signal.SIG_BLOCK, []))
    if signal.SIGTERM not in mine:
        return  # the default action is in place
    parent = os.getppid()

    def wait() -> None:
        while True:
            info = signal.sigtimedwait(mine, 5.0)
            if info is not None and info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(128 + signal.SIGTERM)

    threading.Thread(target=wait, name="worker-parent-sigterm", daemon=True).start()
