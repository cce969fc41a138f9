"""Process pools of the sharding commands that can always be shut down.

`Pool.terminate()` (also what `with Pool` does on exit) sends SIGTERM to every
worker and joins it. A worker that inherited SIGTERM blocked, or a Python
handler for it, never ends and the join waits forever. Both are inherited from
the caller: the signal mask even survives exec, and the training entry point
blocks SIGTERM on purpose (pipeline/training/preemption.py). So every worker
first gives SIGTERM its default action back.
"""
from __future__ import annotations

import signal


def _accept_terminate() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def start_pool(ctx, processes: int):
    """`ctx.Pool(processes)` whose workers end on terminate() whatever the caller's signal state."""
    return ctx.Pool(processes, initializer=_accept_terminate)
