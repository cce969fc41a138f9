"""launch/slurm.example.sh: --help works outside a SLURM job, and a run outside
one stops with a clear message instead of an unbound-variable error."""
import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "launch" / "slurm.example.sh"


def _run(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def test_help_outside_slurm():
    res = _run("--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Usage: sbatch") and "checkpoint.resume=auto" in res.stdout


def test_outside_a_job_it_says_to_submit_with_sbatch():
    res = _run("data.train_shards=/x")
    assert res.returncode == 2
    assert "SLURM_JOB_ID" in res.stderr and "sbatch" in res.stderr and "unbound" not in res.stderr
