"""Read offline W&B runs back with W&B's own CLI (`wandb leet inspect`).

The tests and the demo use this to check what training and evaluation logged,
the way a user would inspect an offline run before `wandb sync`. It is not part
of the installed packages: nothing at run time reads W&B back.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def _leet_inspect(run_path: str, options: list[str], timeout: float) -> str:
    """stdout of `wandb leet inspect OPTIONS RUN_PATH`; a CLI failure raises with its
    stderr, so a run that cannot be read is never mistaken for an empty one."""
    wandb_cli = os.path.join(os.path.dirname(sys.executable), "wandb")
    proc = subprocess.run([wandb_cli, "leet", "inspect", *options, run_path],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"wandb leet inspect {run_path} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def read_offline_run(run_path: str, timeout: float = 120.0) -> dict:
    """Read an offline W&B run back with W&B's own CLI (`wandb leet inspect --summary --json`).

    `run_path` is an offline run folder or its .wandb file. Returns the parsed
    JSON (keys such as "run_id", "config" and "summary"; a logged table appears
    in "summary" as a pointer {"_type": "table-file", "path": ...} to its JSON
    under the run's files/ folder).
    """
    return json.loads(_leet_inspect(run_path, ["--summary", "--json"], timeout))


def read_offline_run_record(run_path: str, timeout: float = 120.0) -> dict:
    """The run record of an offline W&B run (`wandb leet inspect --json`, the first
    record of type "run"): "run_group", "job_type", "project", "config", ... which
    the --summary view does not show."""
    for line in _leet_inspect(run_path, ["--json"], timeout).splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("type") == "run":
            return record["run"]
    raise RuntimeError(f"wandb leet inspect {run_path}: the log holds no run record")
