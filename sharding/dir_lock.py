"""One writer per output folder, also across the nodes of a shared file system.

The sharder holds `OUT_DIR/.sharder/run.lock` while it writes a shard set and
training holds `<output_dir>/run.lock` for the whole run (global rank 0 takes
it). An `flock` would not do: it is released by the kernel of the node that
took it, and many cluster file systems (NFS without lockd, Lustre mounted
without `flock`) either refuse it or do not share it between nodes. So the
lock is a small JSON file naming its holder:

    {"host": ..., "pid": ..., "pid_start": ..., "started": ..., "refreshed": ..., "token": ..., "owner": ...}

* It is created by `link(2)` of a complete temporary file: atomic on local
  and network file systems (the classic NFS lock-file technique), so a
  reader never sees a half-written lock and two starters cannot both win.
* While held, a heartbeat thread rewrites `refreshed` every `refresh_s`
  (write a temporary file, then `os.replace`).
* A lock is stale, and taken over with a warning naming the old holder, when
  its holder is on this host and its pid is dead (or now belongs to another
  process: `pid_start` differs), when it was not refreshed for
  `stale_after_s` (a holder on another node that died; the clocks of the
  nodes are assumed to agree to well within that time, as NTP keeps them),
  or when it cannot be read (no writer of this module leaves such a file).
  Take-overs are serialised by a second lock file (`<lock>.takeover`, made
  the same way), so two runs that find the same stale lock cannot both take it.
* A live lock raises `OutputLocked` naming the holder (host, pid, start time,
  last refresh).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
TAKEOVER_SUFFIX = ".takeover"


class OutputLocked(Exception):
    """Another live run holds the folder (the message names it)."""


@dataclass(frozen=True)
class LockHolder:
    """What a lock file says about its holder."""

    host: str
    """Host name of the holder (socket.gethostname())."""
    pid: int
    """Process id of the holder on `host`."""
    pid_start: int | None
    """Start time of that process in clock ticks since boot (/proc/PID/stat), to tell a reused pid."""
    started: float
    """When the lock was taken (Unix time)."""
    refreshed: float
    """Last heartbeat (Unix time)."""
    token: str
    """Unique id of this holding (a take-over or a restart gets a new one)."""
    owner: str = ""
    """What holds it (e.g. "training", "sharder"), for the messages."""

    def describe(self) -> str:
        def when(t: float) -> str:
            return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))

        return (f"{self.owner or 'a run'} on host {self.host}, pid {self.pid}, started {when(self.started)}, "
                f"last refreshed {when(self.refreshed)} ({max(0.0, time.time() - self.refreshed):.0f}s ago)")


def proc_stat(pid: int) -> list[str] | None:
    """Fields 3... of /proc/PID/stat (state, ppid, ...), or None (no such process, not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            # The command name (field 2) may hold spaces and parentheses: split after its last ")".
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (stat field 22), or None."""
    fields = proc_stat(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def parent_pid(pid: int) -> int | None:
    """The parent of `pid` (stat field 4), or None."""
    fields = proc_stat(pid)
    try:
        return int(fields[1]) if fields else None
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def read_holder(path: str) -> LockHolder | None:
    """The holder a lock file names; None when it is unreadable or not a lock of this module."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return LockHolder(**{k: d[k] for k in LockHolder.__dataclass_fields__ if k in d})
    except (OSError, ValueError, TypeError):
        return None


def stale_reason(holder: LockHolder | None, stale_after_s: float, host: str | None = None,
                 now: float | None = None) -> str | None:
    """Why `holder` no longer holds its lock, or None when it is live."""
    if holder is None:
        return "the lock file cannot be read"
    host = host or socket.gethostname()
    now = time.time() if now is None else now
    if holder.host == host:
        if not pid_alive(holder.pid):
            return f"its process {holder.pid} on this host is dead"
        start = process_start(holder.pid)
        if holder.pid_start is not None and start is not None and start != holder.pid_start:
            return f"pid {holder.pid} on this host now belongs to another process"
    age = now - holder.refreshed
    if age > stale_after_s:
        return f"it was not refreshed for {age:.0f}s (stale after {stale_after_s:g}s)"
    return None


def _write_new(path: str, text: str) -> bool:
    """Create `path` holding `text`, atomically; False when it exists already."""
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _replace(path: str, text: str) -> None:
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class DirLock:
    """A held lock (from `acquire`); `release()` or use as a context manager."""

    def __init__(self, path: str, holder: LockHolder, refresh_s: float):
        self.path = path
        self.holder = holder
        self.refresh_s = refresh_s
        self.lost: str | None = None
        """Set (with the reason) when the heartbeat found the lock no longer ours."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start_heartbeat(self) -> "DirLock":
        if self.refresh_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.path}", daemon=True)
            self._thread.start()
        return self

    def refresh(self) -> bool:
        """Rewrite `refreshed`; False (and `lost` set) when another run holds the file now."""
        current = read_holder(self.path)
        if current is None or current.token != self.holder.token:
            self.lost = (f"{self.path} is no longer this run's lock (now: "
                         f"{current.describe() if current else 'missing or unreadable'})")
            log.error("%s; another run may be writing the same folder", self.lost)
            return False
        self.holder = LockHolder(**{**asdict(self.holder), "refreshed": time.time()})
        _replace(self.path, json.dumps(asdict(self.holder)))
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                if not self.refresh():
                    return
            except OSError as e:  # a transient file-system error must not end the run
                log.warning("refreshing %s failed: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        current = read_holder(self.path)
        if current is not None and current.token == self.holder.token:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "DirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(path: str, owner: str, *, stale_after_s: float = 600.0, refresh_s: float = 30.0,
            attempts: int = 5) -> DirLock:
    """Take the lock file `path` (its folder must exist) and start its heartbeat.

    Raises OutputLocked naming the holder when a live run holds it."""
    if refresh_s > 0 and stale_after_s <= 2 * refresh_s:
        raise ValueError(f"stale_after_s={stale_after_s:g} must exceed twice refresh_s={refresh_s:g}, or a live "
                         f"holder between two heartbeats would count as stale")
    host, pid = socket.gethostname(), os.getpid()
    for _ in range(attempts):
        now = time.time()
        mine = LockHolder(host=host, pid=pid, pid_start=process_start(pid), started=now, refreshed=now,
                          token=uuid.uuid4().hex, owner=owner)
        text = json.dumps(asdict(mine))
        if _write_new(path, text):
            return DirLock(path, mine, refresh_s).start_heartbeat()
        old = read_holder(path)
        why = stale_reason(old, stale_after_s, host)
        if why is None:
            raise OutputLocked(f"{os.path.dirname(path) or '.'} is in use by {old.describe()} (lock file {path}); "
                               f"wait for it to end, use another folder, or delete {path} if that run is "
                               f"certainly gone (a lock not refreshed for {stale_after_s:g}s is taken over)")
        if _take_over(path, old, text, stale_after_s):
            log.warning("took over the lock %s: the previous holder (%s) is gone: %s", path,
                        old.describe() if old else "unknown", why)
            return DirLock(path, mine, refresh_s).start_heartbeat()
        time.sleep(0.2)  # someone else is taking it over, or released it: look again
    raise OutputLocked(f"could not take the lock {path} in {attempts} attempts (other runs are starting into "
                       f"{os.path.dirname(path) or '.'} at the same time)")


def _take_over(path: str, old: LockHolder | None, text: str, stale_after_s: float) -> bool:
    guard = path + TAKEOVER_SUFFIX
    if not _write_new(guard, text):
        # A taker that died holding the guard would block every later run: its guard is short-lived.
        try:
            if time.time() - os.path.getmtime(guard) > min(60.0, stale_after_s):
                os.remove(guard)
        except FileNotFoundError:
            pass
        return False
    try:
        current = read_holder(path)
        same = (current is None and old is None) or (current is not None and old is not None
                                                     and current.token == old.token)
        if not same or not os.path.exists(path):
            return False  # it changed hands (or was released) since we looked
        _replace(path, text)
        return True
    finally:
        os.remove(guard)
