"""pipeline/training/preemption.py: the stop-request sources, the grace timer,
the marker and STOP-file housekeeping, in this process (the launcher paths are
tests/integration/test_preemption.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from pipeline.training import preemption
from pipeline.training.preemption import StopRequests, WatchedProcess


def _wait(cond, timeout=10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def stops():
    made = []

    def make(**kw):
        s = StopRequests(**{"poll_s": 0.05, "grace_s": 0, "watch_launcher": False, **kw}).start()
        made.append(s)
        return s

    yield make
    for s in reversed(made):  # each restores the state from before its start()
        s.close(restore=True)


def test_a_configured_signal_is_a_request_and_does_not_kill(stops):
    s = stops(signals=("SIGUSR1",))
    assert not s.requested
    os.kill(os.getpid(), signal.SIGUSR1)  # default action would end the test process
    assert _wait(lambda: s.requested)
    assert s.reason.startswith("signal SIGUSR1")
    # A second signal is logged, not a new request.
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.2)
    assert s.reason.startswith("signal SIGUSR1")


def test_a_signal_reaching_an_unblocked_thread_still_requests(stops):
    """A thread started before the mask (torch's own) does not block the signal:
    the Python handler catches it and requests the same stop."""
    s = stops(signals=("SIGUSR2",))
    got = threading.Event()

    def unblocked():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)
        got.set()

    t = threading.Thread(target=unblocked)
    t.start()
    t.join()
    assert got.is_set() and _wait(lambda: s.requested)
    assert s.reason == "signal SIGUSR2"


def test_the_stop_file_is_a_request_once_watched(stops, tmp_path):
    s = stops()
    path = tmp_path / preemption.STOP_FILE
    path.touch()
    time.sleep(0.2)
    assert not s.requested  # not watched yet
    s.watch_stop_file(str(path))
    assert _wait(lambda: s.requested) and str(path) in s.reason


def test_the_grace_period_ends_the_rank_with_status_75(stops):
    exits = []
    s = stops(grace_s=0.2)
    s._exit_now = exits.append
    s.request("test")
    assert _wait(lambda: exits == [75], 5)
    s2 = stops(grace_s=0.3)
    s2._exit_now = exits.append
    s2.request("test")
    s2.done()  # the checkpoint was written in time
    time.sleep(0.6)
    assert exits == [75]


def test_a_watched_process_is_gone_when_it_exits_or_its_pid_is_reused():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    p = psutil.Process(child.pid)
    w = WatchedProcess(child.pid, p.create_time(), "the node launcher")
    assert w.gone() is None
    assert "another process" in WatchedProcess(child.pid, p.create_time() - 100, "x").gone()
    child.kill()
    child.wait()
    assert w.gone() == f"the node launcher (pid {child.pid}) exited"


def test_the_launcher_is_watched_only_under_a_distributed_launcher():
    assert preemption.launcher_processes(env={}) == []
    watched = preemption.launcher_processes(env={"LOCAL_RANK": "0"})
    assert [w.pid for w in watched][:1] == [os.getppid()]


def test_the_launcher_going_away_is_a_request(stops, monkeypatch):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    proc = WatchedProcess(child.pid, psutil.Process(child.pid).create_time(), "the deepspeed runner")
    monkeypatch.setattr(preemption, "launcher_processes", lambda: [proc])
    s = stops(watch_launcher=True)
    time.sleep(0.2)
    assert not s.requested
    child.kill()
    child.wait()
    assert _wait(lambda: s.requested)
    assert s.reason == f"the launcher is gone: the deepspeed runner (pid {child.pid}) exited"


def test_clear_previous_removes_the_marker_and_only_an_older_stop_file(tmp_path):
    marker = preemption.write_marker(str(tmp_path), {"step": 4})
    assert json.loads(open(marker).read())["exit_status"] == 75
    stop = tmp_path / preemption.STOP_FILE
    stop.touch()
    os.utime(stop, (time.time() - 60, time.time() - 60))
    assert sorted(preemption.clear_previous(str(tmp_path), time.time())) == sorted([marker, str(stop)])
    stop.touch()  # a request made after this run started stays
    assert preemption.clear_previous(str(tmp_path), time.time() - 30) == []
    assert stop.exists()


def test_preempted_exits_with_75():
    with pytest.raises(SystemExit) as e:
        raise preemption.Preempted("stopped")
    assert e.value.code == 75 and str(e.value) == "stopped"


def _mask() -> set[int]:
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, []))


def test_the_entry_point_gives_the_mask_back_unless_it_trains(tmp_path):
    """cli.main blocks the stop signals before torch starts threads; when it ends
    without training (a config error, --help) the caller's mask is unchanged,
    so an in-process caller's later child processes can still be SIGTERMed."""
    from pipeline.training.cli import main as train_main

    tiny = os.path.join(os.path.dirname(__file__), "..", "..", "..", "launch", "recipes", "tiny-cpu.yaml")
    before = _mask()
    assert not before & preemption.signal_numbers(preemption.STOP_SIGNALS)
    assert train_main(["--config", tiny, f"data.train_shards={tmp_path / 'absent'}"]) == 2
    assert _mask() == before
    with pytest.raises(SystemExit):
        train_main(["--help"])
    assert _mask() == before


def test_close_restores_a_mask_that_was_blocked_before_start():
    """Under the entry point the signals are blocked before start(): close keeps
    them blocked (a rank must not die of the launcher's SIGTERM mid-exit)."""
    before = _mask()
    nums = preemption.signal_numbers(preemption.STOP_SIGNALS)
    signal.pthread_sigmask(signal.SIG_BLOCK, nums)
    try:
        s = StopRequests(poll_s=0.05, grace_s=0, watch_launcher=False).start()
        s.close()
        assert nums <= _mask()
        assert all(signal.getsignal(n) is not s._on_signal for n in nums)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
