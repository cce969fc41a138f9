"""Start `launch/train.py` through the real `deepspeed` launcher on this machine.

Used by the demo, the integration tests and the training benchmark, so that
all three run training exactly the way a user does (`deepspeed --num_gpus N
launch/train.py --config RECIPE key=value ...`), with the CPU settings in one
place: DeepSpeed's CPU accelerator (gloo when oneCCL is absent), one intra-op
thread per rank so ranks do not fight over cores, and a free master port so
that concurrent jobs on a shared machine do not collide on 29500.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: launch/ is not installed
TRAIN_SCRIPT = os.path.join(REPO, "launch", "train.py")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_executable() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    if not os.path.isfile(exe):
        raise FileNotFoundError(f"no deepspeed launcher next to {sys.executable}; install deepspeed")
    return exe


def cpu_env(threads_per_rank: int = 1, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS=str(threads_per_rank),
        MKL_NUM_THREADS=str(threads_per_rank),
        TOKENIZERS_PARALLELISM="false",
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
    )
    # Our own run id/dir handling decides; stray user settings would split runs.
    for k in ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR"):
        env.pop(k, None)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if extra:
        env.update(extra)
    return env


def deepspeed_command(recipe: str, overrides: list[str], num_ranks: int = 2,
                      master_port: int | None = None) -> list[str]:
    return [deepspeed_executable(), "--num_gpus", str(num_ranks),
            "--master_port", str(master_port or free_port()), TRAIN_SCRIPT, "--config", recipe, *overrides]


class TrainingJob:
    """One `deepspeed` training job started in the background, in its own
    process group (so a test can signal the launcher alone, the whole group, or
    one rank, the way a user, SLURM or a crashing node would). Output streams
    into `log_path` (and to the console with echo=True)."""

    def __init__(self, recipe: str, overrides: list[str], log_path: str, num_ranks: int = 2,
                 env: dict | None = None, echo: bool = False):
        self.cmd = deepspeed_command(recipe, overrides, num_ranks)
        self.log_path = log_path
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        self.started = time.monotonic()
        self._log = open(log_path, "w", encoding="utf-8")
        self._log.write("$ " + " ".join(self.cmd) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env or cpu_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        self._echo = echo
        self._pump = threading.Thread(target=self._copy_output, daemon=True)
        self._pump.start()

    def _copy_output(self) -> None:
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()
            if self._echo:
                sys.stdout.write(line)
                sys.stdout.flush()

    @property
    def pid(self) -> int:
        """The `deepspeed` runner's pid (also the process group id)."""
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_until(self, what: str, cond, timeout: float, interval: float = 0.2):
        """Poll `cond()` while the job runs and return its first truthy value;
        AssertionError naming `what`, with the log's tail, when the job ends first
        or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"the job ended (exit status {self.proc.returncode}) before {what}:\n"
                                     f"{self.log()[-4000:]}")
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.log()[-4000:]}")

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal the runner's process group (the launcher, its node launcher and the ranks)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float | None = None) -> int:
        """The runner's exit status; on timeout the whole group is killed and TimeoutError raised."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            self.proc.wait()
            self._finish()
            raise TimeoutError(f"deepspeed training did not finish within {timeout:.0f}s; log {self.log_path}")
        self._finish()
        return rc

    def _finish(self) -> None:
        self._pump.join(timeout=30)
        self._log.close()

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def run_training(recipe: str, overrides: list[str], log_path: str, num_ranks: int = 2,
                 timeout: float | None = None, env: dict | None = None, echo: bool = False) -> float:
    """Run one training job to completion; returns its wall time in seconds.

    Output goes to `log_path` (and to the console with echo=True); a non-zero
    exit raises with the log's tail, so a failure is never silent.
    """
    job = TrainingJob(recipe, overrides, log_path, num_ranks=num_ranks, env=env, echo=echo)
    try:
        rc = job.wait(timeout)
    finally:
        if job.proc.poll() is None:
            job.kill_group()
    elapsed = job.elapsed()
    if rc != 0:
        raise RuntimeError(f"deepspeed training exited with {rc} after {elapsed:.0f}s; log {log_path}:\n"
                           f"{job.log()[-6000:]}")
    return elapsed


# DeepSpeed JIT-compiles these C++ ops the first time a CPU job uses them
# (about 2.5 minutes on 2 cores; cached under ~/.cache/torch_extensions or
# $TORCH_EXTENSIONS_DIR afterwards).
CPU_OPS = ("FusedAdamBuilder", "ShareMemCommBuilder")


def build_cpu_ops(timeout: float = 1800.0, echo: bool = False) -> float:
    """Compile (or load from the cache) DeepSpeed's CPU ops in a child process.

    Doing this once, up front, keeps the first-run compilation out of the time
    of the first training job: callers with a per-job timeout (tests, the demo)
    would otherwise have to budget minutes of compilation into every job.
    Returns the seconds it took (about 1 s when cached).
    """
    code = ("from deepspeed.accelerator import get_accelerator\n"
            f"for name in {CPU_OPS!r}:\n"
            "    get_accelerator().create_op_builder(name).load(verbose=False)\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cpu_env(), timeout=timeout,
                          stdout=None if echo else subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building DeepSpeed's CPU ops {CPU_OPS} failed ({proc.returncode}):\n"
                           f"{(proc.stdout or '')[-4000:]}")
    return time.monotonic() - t0
