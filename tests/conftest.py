"""Guards shared by every test.

The training entry point blocks the stop signals (SIGTERM, SIGINT, SIGUSR1) and
installs handlers for them. A test that runs it in-process and leaves that
state behind poisons every later test of the session: processes forked from
pytest inherit the blocked mask, so `Pool.terminate()` (which sends SIGTERM and
joins) waits forever. CI once lost 30 minutes to two such hangs in the
sharding tests, far from the test that leaked. This fixture makes the leak fail
the test that caused it, and restores the state so the rest of the run is clean.
"""
from __future__ import annotations

import os
import signal

import pytest

_GUARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@pytest.fixture(autouse=True)
def _no_leaked_signal_state(request):
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    handlers = {n: signal.getsignal(n) for n in _GUARDED}
    yield
    leaked = []
    now = signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if set(now) != set(mask):
        changed = sorted(signal.Signals(n).name for n in set(now) ^ set(mask))
        leaked.append(f"blocked-signal mask changed for {changed}")
    for n, h in handlers.items():
        if signal.getsignal(n) is not h:
            leaked.append(f"{signal.Signals(n).name} handler changed to {signal.getsignal(n)!r}")
            signal.signal(n, h)
    if leaked:
        pytest.fail(f"{request.node.nodeid} left process-wide signal state behind "
                    f"(restored now): {'; '.join(leaked)}", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skipped test fails: CI installs every extra and tool the suite
    needs, so a skip there means code that nobody tested (the test's own reason is kept)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which must run every test: {reason}"
