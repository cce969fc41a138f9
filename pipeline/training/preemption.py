"""Stop requests: a signal, a vanished launcher or a STOP file ends a training
run with a checkpoint and exit status 75 ("preempted, resumable").

How a stop reaches the ranks under DeepSpeed 0.19 (read from
deepspeed/launcher/runner.py and launch.py), and what this module does about it:

- A signal to the `deepspeed` runner alone (a SIGTERM from another shell, a
  scheduler that signals the job's main process): the runner forwards signals
  only for multi-node pdsh launches, so it dies and its node launcher and ranks
  would train on, orphaned. The ranks watch the launcher: their parent (the node
  launcher) and, under DeepSpeed's node launcher, the runner above it, each
  recorded with its start time (a pid can be reused). One gone is a stop request.
- A signal to the whole process group (Ctrl-C, SLURM at the time limit): every
  rank gets it, and the node launcher SIGTERMs each rank's process tree (loader
  workers included), waits up to 30 s, then SIGKILLs it. The save therefore has
  those 30 s; a bigger one needs the STOP file route below.
- A signal to one rank: that rank's request travels to the others in the next
  micro-batch's all-reduce.
- A file `<output_dir>/STOP`: for schedulers that warn ahead of time
  (`#SBATCH --signal=B:USR1@120`: launch/slurm.example.sh traps the signal in the
  batch shell and touches the file). Nothing is killed, so the save has the
  scheduler's whole warning time.

Signals are received by a thread in `sigtimedwait` with the stop signals
blocked in every other thread of the rank, so no system call of gloo, NCCL or
the loader is interrupted (EINTR) by them; the mask is set before any thread or
loader worker exists (pipeline/training/cli.py blocks them before importing torch), and
forked loader workers inherit it, so a SIGTERM to the group cannot kill them in
the middle of the checkpoint (torch would then raise "DataLoader worker killed"
in the rank). The W&B service is not covered by the mask (wandb-core catches
SIGTERM itself and exits without writing a buffered offline run), so rank 0
starts it outside its process tree and session (pipeline/tracking.py,
WandbConfig.detached_service): neither a signal to the group nor the launcher's
tree kill reaches it, and rank 0 logs the last step and finishes the run. Python-level handlers catch a signal that reaches a thread which
does not block it (started before the mask) and request the same stop.

Every rank finishes its current optimizer step: the loop sends the request in
MicroStats.stop_requested, which the step's all-reduce sums, so all ranks leave
after the same step; then a complete checkpoint of it is written, rank 0 writes
`<output_dir>/PREEMPTED` (JSON: step, checkpoint, reason) and every rank exits
with status 75. A rank still busy `grace_s` after the request exits with 75
anyway, saying that the save did not complete. A resumed run removes the marker
and an older STOP file.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

# The stop signals and the mask are shared with the loader workers.
from pipeline.process_signals import STOP_SIGNALS, signal_numbers
from common.atomic_files import write_atomic

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""Exit status of a stopped run: "preempted, resumable" (EX_TEMPFAIL of sysexits.h)."""
STOP_FILE = "STOP"
"""<output_dir>/STOP: a stop request (launch/slurm.example.sh touches it)."""
MARKER_FILE = "PREEMPTED"
"""<output_dir>/PREEMPTED: written by a stopped run (JSON), removed by the next start."""


class Preempted(SystemExit):
    """The run stopped on request (exit status 75); it continues with checkpoint.resume=auto."""

    def __init__(self, message: str):
        super().__init__(EXIT_PREEMPTED)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class WatchedProcess:
    """A process whose end is a stop request, recorded with its start time."""

    pid: int
    create_time: float
    what: str

    def gone(self) -> str | None:
        """Why the process counts as gone (None: alive). A reused pid has another start time."""
        import psutil

        try:
            p = psutil.Process(self.pid)
            if abs(p.create_time() - self.create_time) > 0.01:
                return f"{self.what} (pid {self.pid}) exited (its pid now belongs to another process)"
            if p.status() == psutil.STATUS_ZOMBIE:
                return f"{self.what} (pid {self.pid}) exited"
        except psutil.NoSuchProcess:
            return f"{self.what} (pid {self.pid}) exited"
        except psutil.Error:
            return None
        return None


def launcher_processes(env: dict | None = None) -> list[WatchedProcess]:
    """The launcher above this rank: its parent when a distributed launcher
    started it (LOCAL_RANK in the environment), and, when that parent is
    DeepSpeed's node launcher, the `deepspeed` runner above it. A process started
    by hand (a shell, nohup) watches nothing: its parent's end is no request."""
    import psutil

    env = os.environ if env is None else env
    if "LOCAL_RANK" not in env or os.getppid() <= 1:
        return []
    try:
        parent = psutil.Process(os.getppid())
        watched = [WatchedProcess(parent.pid, parent.create_time(), "the node launcher")]
        if any("deepspeed.launcher.launch" in part for part in parent.cmdline()):
            runner = parent.parent()
            if runner is not None and runner.pid > 1 and any(
                    os.path.basename(part).startswith("deepspeed") or "deepspeed.launcher.runner" in part
                    for part in runner.cmdline()[:3]):
                watched.append(WatchedProcess(runner.pid, runner.create_time(), "the deepspeed runner"))
        return watched
    except psutil.Error as e:
        log.warning("cannot record the launcher processes (%s): a vanished launcher will not stop this rank", e)
        return []


def clear_previous(output_dir: str, started_at: float) -> list[str]:
    """Rank 0 at start-up: remove the PREEMPTED marker of the previous run and a
    STOP file older than this run (a newer one is a request for this run).
    Returns what was removed."""
    removed = []
    marker = os.path.join(output_dir, MARKER_FILE)
    if os.path.isfile(marker):
        with contextlib.suppress(OSError):
            with open(marker, encoding="utf-8") as f:
                log.info("the previous run of %s was stopped: %s", output_dir, f.read().strip())
        os.remove(marker)
        removed.append(marker)
    stop = os.path.join(output_dir, STOP_FILE)
    with contextlib.suppress(FileNotFoundError):
        if os.stat(stop).st_mtime < started_at:
            os.remove(stop)
            removed.append(stop)
    return removed


def write_marker(output_dir: str, record: dict) -> str:
    """Rank 0: <output_dir>/PREEMPTED, atomically."""
    path = os.path.join(output_dir, MARKER_FILE)
    write_atomic(path, json.dumps({**record, "exit_status": EXIT_PREEMPTED, "host": socket.gethostname(),
                                   "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
    return path


class StopRequests:
    """This rank's stop requests: signals, the launcher's end, the STOP file.

    start() installs the signal thread and the watcher; `requested` is then
    polled by the loop (one attribute read per micro-batch). The first request
    arms the grace timer; done() disarms it once the stop's checkpoint is written.
    """

    def __init__(self, signals: Iterable[str] = STOP_SIGNALS, *, grace_s: float = 120.0,
                 watch_launcher: bool = True, poll_s: float = 2.0, rank: int = 0,
                 exit_now: Callable[[int], None] = os._exit):
        self.signals = tuple(signals)
        self.grace_s = grace_s
        self.watch_launcher = watch_launcher
        self.poll_s = poll_s
        self.rank = rank
        self.reason: str | None = None
        """What requested the stop (None: nothing yet)."""
        self.requested_at: float | None = None
        self._exit_now = exit_now
        self._event = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._threads: list[threading.Thread] = []
        self._old_handlers: dict[int, object] = {}
        self._mask_before: set[int] | None = None
        self._watched: list[WatchedProcess] = []
        self._stop_file: str | None = None

    @classmethod
    def from_config(cls, cfg, rank: int) -> "StopRequests":
        """From a PreemptionConfig (pipeline/training/config_sections.py)."""
        return cls(cfg.signals, grace_s=cfg.grace_s, watch_launcher=cfg.watch_launcher, poll_s=cfg.poll_s,
                   rank=rank)

    # ------------------------------------------------------------------ requests

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, reason: str) -> None:
        """Record a stop request (the first one counts; later ones are logged)."""
        with self._lock:
            if self._event.is_set():
                log.warning("rank %d: %s while already stopping (%s); the stop goes on", self.rank, reason,
                            self.reason)
                return
            self.reason, self.requested_at = reason, time.monotonic()
            self._event.set()
            if self.grace_s > 0:
                self._timer = threading.Timer(self.grace_s, self._grace_expired)
                self._timer.daemon = True
                self._timer.start()
        log.warning("rank %d: stop requested (%s): finishing the current optimizer step, then a checkpoint "
                    "and exit status %d%s", self.rank, reason, EXIT_PREEMPTED,
                    f" (grace period {self.grace_s:g} s)" if self.grace_s > 0 else "")

    def _grace_expired(self) -> None:
        log.error("rank %d: the grace period of %g s after the stop request (%s) ran out before the checkpoint "
                  "was complete; exiting with status %d now. checkpoint.resume=auto continues from the newest "
                  "complete checkpoint (an incomplete one is ignored).", self.rank, self.grace_s, self.reason,
                  EXIT_PREEMPTED)
        for h in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                h.flush()
        self._exit_now(EXIT_PREEMPTED)

    def done(self) -> None:
        """The stop's checkpoint is written: disarm the grace timer."""
        if self._timer is not None:
            self._timer.cancel()

    # ------------------------------------------------------------------ sources

    def start(self) -> "StopRequests":
        """Install the signal thread and handlers and (watch_launcher) record the launcher."""
        nums = signal_numbers(self.signals)
        self._mask_before = set(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        # Signals blocked earlier (cli.main) but not configured get their default action back.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signal_numbers(STOP_SIGNALS) - nums)
        signal.pthread_sigmask(signal.SIG_BLOCK, nums)
        if threading.current_thread() is threading.main_thread():
            for n in nums:
                self._old_handlers[n] = signal.signal(n, self._on_signal)
        if self.watch_launcher:
            self._watched = launcher_processes()
        self._spawn(self._wait_for_signals, nums)
        self._spawn(self._watch)
        return self

    def watch_stop_file(self, path: str) -> None:
        """Treat `path` appearing (or being there) as a request, from now on."""
        self._stop_file = path

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, name=f"stop-requests-{target.__name__}", daemon=True)
        t.start()
        self._threads.append(t)

    def _on_signal(self, signum, _frame) -> None:
        self.request(f"signal {signal.Signals(signum).name}")

    def _wait_for_signals(self, nums: set[int]) -> None:
        while not self._closing.is_set():
            info = signal.sigtimedwait(nums, 0.5)
            if info is not None:
                self.request(f"signal {signal.Signals(info.si_signo).name} from pid {info.si_pid}")

    def _watch(self) -> None:
        while not self._closing.wait(self.poll_s):
            if self._event.is_set():
                continue
            for p in self._watched:
                why = p.gone()
                if why:
                    self.request(f"the launcher is gone: {why}")
                    break
            if self._stop_file is not None and os.path.exists(self._stop_file):
                self.request(f"{self._stop_file} exists")

    def close(self, restore: bool = True) -> None:
        """Stop the threads and the timer. restore: also give the signals their
        previous handlers and the thread its mask from before start(). Under the
        training entry point that mask has the stop signals blocked already
        (cli.main), so a run keeps them blocked to its exit and the launcher's
        SIGTERM after the save cannot kill a rank mid-exit; an in-process
        caller (a test, a notebook) gets its signal state back unchanged."""
        self._closing.set()
        self.done()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        if restore:
            for n, h in self._old_handlers.items():
                signal.signal(n, h)
            self._old_handlers.clear()
            if self._mask_before is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, self._mask_before)
