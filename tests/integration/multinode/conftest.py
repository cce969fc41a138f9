"""Two "nodes" on one machine: an sshd of the tests' own and two loopback hosts.

The multi-node tests launch through `deepspeed --hostfile` with the default
pdsh launcher exactly as on a cluster: pdsh ssh'es into every hostfile host
and starts DeepSpeed's per-node launcher there. Here the hosts are 127.0.0.2
and 127.0.0.3 (Linux routes all of 127/8 to the loopback device, so both are
this machine but distinct addresses), served by an sshd that listens only on
them, on a free port, with a host key and a client key made for the session.
Nothing touches ~/.ssh or the system sshd: the client options travel in
PDSH_SSH_ARGS_APPEND (pdsh appends it to every ssh command line) and the port
in DeepSpeed's own --ssh_port, so the same command works on any machine.

pdsh and sshd come from Debian's `pdsh` and `openssh-server`; when missing
they are installed here (root only, bounded time), and the tests are skipped,
with the reason, only when that is impossible.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HOSTS = ("127.0.0.2", "127.0.0.3")
PACKAGES = ("pdsh", "openssh-server")
INSTALL_TIMEOUT_S = 300


def _sshd() -> str | None:
    return shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
                                         if os.access(p, os.X_OK)), None)


def _missing_tools() -> list[str]:
    found = {"pdsh": shutil.which("pdsh"), "sshd": _sshd(), "ssh": shutil.which("ssh"),
             "ssh-keygen": shutil.which("ssh-keygen")}
    return [name for name, path in found.items() if not path]


def _apt_install() -> str | None:
    """Install the packages with apt-get; None on success, else why not."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    log = []
    for cmd in (install, ["apt-get", "update"], install):  # retry after refreshing stale package lists
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` did not finish within {INSTALL_TIMEOUT_S}s"
        log.append(f"$ {' '.join(cmd)} -> {proc.returncode}: {proc.stderr.strip()[-300:]}")
        if cmd is install and proc.returncode == 0:
            return None
    return "; ".join(log)


@pytest.fixture(scope="session")
def ssh_tools() -> None:
    """pdsh, sshd, ssh and ssh-keygen on this machine, installed when missing and possible."""
    missing = _missing_tools()
    if not missing:
        return
    if os.geteuid() != 0:
        pytest.skip(f"multi-node tests need {', '.join(missing)} (Debian: apt-get install {' '.join(PACKAGES)}); "
                    "not installed and not root, so they cannot be installed here")
    if not shutil.which("apt-get"):
        pytest.skip(f"multi-node tests need {', '.join(missing)}; no apt-get to install {' '.join(PACKAGES)}")
    why = _apt_install()
    if why is not None or _missing_tools():
        pytest.skip(f"multi-node tests need {', '.join(_missing_tools())}; installing {' '.join(PACKAGES)} "
                    f"failed: {why}")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_listening(host: str, port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"sshd did not listen on {host}:{port} within {timeout}s")


@dataclass
class LoopbackCluster:
    """What a test needs to launch on the two loopback hosts."""

    root: Path
    """Folder with the keys, sshd_config and the hostfile."""
    port: int
    """Port of the tests' sshd on every host."""
    key: Path
    """Client private key (its public half is the only authorized key)."""
    hostfile: Path
    """DeepSpeed hostfile: one line per host, slots=1."""
    hosts: tuple[str, ...] = HOSTS
    sshd_log: Path | None = None
    pids: list[int] = field(default_factory=list)

    @property
    def ssh_options(self) -> list[str]:
        # -F none: no ~/.ssh/config and no /etc/ssh/ssh_config; the known-hosts
        # policy is this session's alone (a fresh host key each session).
        return ["-F", "none", "-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", "ConnectTimeout=10"]

    def env(self, base: dict | None = None) -> dict:
        """An environment whose pdsh reaches the hosts (DeepSpeed adds -p from --ssh_port)."""
        env = dict(os.environ if base is None else base)
        env["PDSH_SSH_ARGS_APPEND"] = " ".join(self.ssh_options)
        return env

    def launcher_args(self) -> list[str]:
        """`deepspeed` arguments for this cluster; the runner's own ssh pre-check
        knows nothing of PDSH_SSH_ARGS_APPEND, hence --no_ssh_check."""
        return ["--hostfile", str(self.hostfile), "--ssh_port", str(self.port), "--no_ssh_check",
                "--master_addr", self.hosts[0]]

    def ssh(self, host: str, command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", *self.ssh_options, "-p", str(self.port), host, command],
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def loopback_cluster(ssh_tools, tmp_path_factory) -> LoopbackCluster:
    """An sshd on 127.0.0.2 and 127.0.0.3 (one free port) for the session."""
    root = tmp_path_factory.mktemp("loopback-cluster")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"fakereasoning-test-{name}",
                        "-f", str(root / name)], check=True, capture_output=True, timeout=30)
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    os.chmod(root / "authorized_keys", 0o600)
    port = _free_port(HOSTS[0])
    pid_file = root / "sshd.pid"
    (root / "sshd_config").write_text("\n".join([
        f"Port {port}", *[f"ListenAddress {h}" for h in HOSTS], f"HostKey {root / 'host_key'}",
        f"AuthorizedKeysFile {root / 'authorized_keys'}", f"PidFile {pid_file}",
        "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", "UsePAM no",
        # tmp folders are not owned the way StrictModes wants for a user's home.
        "StrictModes no", "PrintMotd no", "PrintLastLog no", "MaxStartups 50:30:100", "MaxSessions 50",
        "LogLevel ERROR", ""]))
    # sshd insists on its privilege-separation folder even when run by hand.
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    sshd_log = root / "sshd.log"
    proc = subprocess.Popen([_sshd(), "-D", "-e", "-f", str(root / "sshd_config")],
                            stdout=open(sshd_log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    hostfile = root / "hostfile"
    hostfile.write_text("".join(f"{h} slots=1\n" for h in HOSTS))
    cluster = LoopbackCluster(root=root, port=port, key=root / "client_key", hostfile=hostfile,
                              sshd_log=sshd_log, pids=[proc.pid])
    try:
        for h in HOSTS:
            _wait_listening(h, port, proc, timeout=20)
            r = cluster.ssh(h, "echo ok")
            if r.returncode != 0 or r.stdout.strip() != "ok":
                raise RuntimeError(f"ssh to {h}:{port} failed ({r.returncode}): {r.stderr.strip()}\n"
                                   f"sshd log: {sshd_log.read_text()[-2000:]}")
    except Exception:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
        raise
    yield cluster
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# --------------------------------------------------------------------------- the job of every run here

REPO = str(Path(__file__).resolve().parents[3])
RECIPE = os.path.join(REPO, "launch", "recipes", "tiny-cpu.yaml")
TRAIN_SCRIPT = os.path.join(REPO, "launch", "train.py")
STEPS, EVERY = 4, 2
LAUNCH_TIMEOUT_S = 300


def job_overrides(shards: Path, out: Path, tokenizer: Path) -> list[str]:
    """One small job for every run of these tests, so that their checkpoints and
    losses can be compared step by step: 4 optimizer steps of micro-batch 4 on
    2 ranks, a checkpoint every 2, a tokenizer made once for the session."""
    return [f"data.train_shards={shards}", f"output_dir={out}", f"tokenizer.path={tokenizer}",
            "data.batch_size=4", "data.num_workers=1", "data.shuffle_buffer=20", f"loop.max_steps={STEPS}",
            f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=3", "checkpoint.export=false",
            "optim.warmup_steps=1"]


@pytest.fixture(scope="session")
def job_data(mmfr_shards, tmp_path_factory) -> dict:
    """The session's training shards and a tokenizer built from them the way
    train.py builds one when tokenizer.path is null (done once, not per run)."""
    from modeling.tokenization.tokenizer import build_bpe_tokenizer
    from pipeline.data.corpus import tokenizer_corpus

    tok = tmp_path_factory.mktemp("tokenizer") / "tokenizer"
    corpus = tokenizer_corpus(str(mmfr_shards / "train"), 2000)
    build_bpe_tokenizer(corpus, str(tok), vocab_size=1024, model_max_length=768)
    return {"shards": mmfr_shards / "train", "tokenizer": tok}


@pytest.fixture(scope="session")
def damaged_shards(job_data, tmp_path_factory) -> dict:
    """A copy of the training shards whose first shard read by rank 1 is damaged
    twice: the images of its samples 1, 3 and 5 are zeroed in place (the tar stays
    readable: three undecodable images early in the stream), and the file is then
    cut at 50% of its bytes, inside a member, as by a failed copy. sizes.json
    still promises every sample."""
    import tarfile

    from pipeline.data.plan import WorkerId, worker_shards

    out = tmp_path_factory.mktemp("damaged") / "train"
    shutil.copytree(job_data["shards"], out)
    names = sorted(json.loads((out / "sizes.json").read_text()))
    first = worker_shards(len(names), 0, 0, True, False, WorkerId(rank=1, world_size=2, worker=0, num_workers=1))[0]
    victim = out / names[first]
    with tarfile.open(victim) as tar:
        images = [m for m in tar.getmembers() if not m.name.endswith(".json")]
    with open(victim, "r+b") as f:
        for m in (images[1], images[3], images[5]):
            f.seek(m.offset_data)
            f.write(b"\0" * m.size)
        size = f.seek(0, os.SEEK_END)
        f.truncate(size // 2)
    return {"dir": out, "victim": victim.name, "corrupted": [images[i].name for i in (1, 3, 5)]}


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def reference_run(job_data, tmp_path_factory) -> dict:
    """The uninterrupted job on one node with 2 ranks (`deepspeed --num_gpus 2`),
    with W&B unreachable: online mode forced, a key set, and WANDB_BASE_URL a
    closed local port. The comparison point of the two-host and fault runs."""
    from launch.local_run import cpu_env, run_training

    base = tmp_path_factory.mktemp("reference")
    out = base / "out"
    closed = _free_port("127.0.0.1")  # bound then released: nothing listens there
    env = cpu_env(extra={"WANDB_MODE": "online", "WANDB_BASE_URL": f"http://127.0.0.1:{closed}",
                         "WANDB_API_KEY": "x" * 40})
    overrides = job_overrides(job_data["shards"], out, job_data["tokenizer"]) + ["wandb.mode=auto",
                                                                                "wandb.init_timeout=5"]
    seconds = run_training(RECIPE, overrides, str(base / "train.log"), env=env, timeout=LAUNCH_TIMEOUT_S)
    return {"out": out, "log": base / "train.log", "seconds": seconds, "wandb_base_url": env["WANDB_BASE_URL"]}


# --------------------------------------------------------------------------- launches on the two hosts

RUN_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


@dataclass
class TwoHostRun:
    """One `deepspeed --hostfile` training launch on the loopback cluster."""

    proc: subprocess.Popen
    out: Path
    log: Path
    started: float

    def wait(self, timeout: float = LAUNCH_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill_leftovers()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def rank_pid(self, rank: int) -> int | None:
        """The training process of `rank` (not its loader workers), found by its
        command line (this run's output_dir) and environment. The ranks are not
        our children: pdsh -> ssh -> sshd -> the node's launcher -> rank."""
        for pid, cmd, env in _processes(f"output_dir={self.out}"):
            if env.get("RANK") == str(rank) and "deepspeed.launcher.launch" in _cmdline(_ppid(pid)):
                return pid
        return None

    def kill_leftovers(self) -> None:
        """SIGKILL every process of this run still alive (by pid, never by name)."""
        for pid, _, _ in _processes(f"output_dir={self.out}"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def _cmdline(pid: int | None) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _processes(marker: str):
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        cmd = _cmdline(int(d.name))
        if marker not in cmd or TRAIN_SCRIPT not in cmd:
            continue
        try:
            raw = (d / "environ").read_bytes()
        except OSError:
            continue
        env = dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)
        yield int(d.name), cmd, env


@pytest.fixture(scope="module")
def two_host_launch(loopback_cluster):
    """start(overrides, run_dir) -> TwoHostRun; every run is reaped at the end."""
    from launch.local_run import cpu_env, deepspeed_executable

    runs: list[TwoHostRun] = []

    def start(overrides: list[str], run_dir: Path, name: str) -> TwoHostRun:
        run_dir.mkdir(parents=True, exist_ok=True)
        # The ranks start over ssh with a fresh environment: a TORCH_EXTENSIONS_DIR of the
        # suite's goes with them, or they rebuild DeepSpeed's ops in the default cache
        # (minutes, inside the launch's timeout) when another venv last built it there.
        run_env = {**RUN_ENV, **{k: os.environ[k] for k in ("TORCH_EXTENSIONS_DIR",) if os.environ.get(k)}}
        # No blank line: DeepSpeed splits every line on "=".
        (run_dir / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in run_env.items()))
        out = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")))
        log = run_dir / f"{name}.log"
        cmd = [deepspeed_executable(), *loopback_cluster.launcher_args(), "--master_port",
               str(_free_port(HOSTS[0])), TRAIN_SCRIPT, "--config", RECIPE, *overrides]
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=run_dir, env=loopback_cluster.env(cpu_env()), stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        run = TwoHostRun(proc, out, log, time.monotonic())
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.kill_leftovers()


@pytest.fixture(scope="session")
def job():
    """The constants and helpers above, for the test modules (which cannot import
    a conftest under --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(steps=STEPS, every=EVERY, recipe=RECIPE, train_script=TRAIN_SCRIPT,
                           timeout=LAUNCH_TIMEOUT_S, overrides=job_overrides, metrics=read_metrics)
