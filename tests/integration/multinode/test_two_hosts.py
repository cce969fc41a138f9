"""`deepspeed --hostfile` over pdsh/ssh on two loopback hosts (127.0.0.2, 127.0.0.3).

Everything runs through launch/multinode_selftest.sh, the script a user runs
on a cluster, so the script is what is tested: its probe launch shows the node
ranks, hosts, rendezvous address and .deepspeed_env forwarding; its training
launch runs the tiny recipe on the two hosts. The checkpoint of that run is
then compared with a 1-node 2-rank run of the same job.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from launch.local_run import REPO, cpu_env, deepspeed_executable

pytestmark = pytest.mark.slow

SELFTEST = os.path.join(REPO, "launch", "multinode_selftest.sh")
FAKE_KEY, FAKE_TOKEN = "fake-wandb-key-2b9d41c7e5", "hf_fakeTokenM4p0q"


def _caller_env(tmp: Path) -> dict:
    env = cpu_env()
    # Variables the ranks must see on both nodes; the selftest writes them into
    # its .deepspeed_env. None of them changes the numerics of the run.
    env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp / "wandb-dir"), WANDB_RUN_GROUP="mn-test group",
               HF_HOME=str(tmp / "hf-home"), HF_HUB_OFFLINE="1",
               # Secrets, which must reach no file, log or command line (they are not needed offline).
               WANDB_API_KEY=FAKE_KEY, HF_TOKEN=FAKE_TOKEN)
    return env


@pytest.fixture(scope="module")
def two_host_run(loopback_cluster, job_data, job, tmp_path_factory) -> dict:
    """The selftest on the two loopback hosts, training the shared job."""
    work = tmp_path_factory.mktemp("selftest")
    env = loopback_cluster.env(_caller_env(work))
    extra = [o for o in job.overrides(job_data["shards"], work / "train", job_data["tokenizer"])
             if not o.startswith(("output_dir=", "data.train_shards="))]
    cmd = ["bash", SELFTEST, "--hostfile", str(loopback_cluster.hostfile), "--workdir", str(work), "--cpu",
           "--ssh-port", str(loopback_cluster.port), "--no-ssh-check", "--steps", str(job.steps),
           "--shards", str(job_data["shards"]), "--", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=2 * job.timeout)
    return {"proc": proc, "work": work, "env": env, "cluster": loopback_cluster}


def _explain(run: dict) -> str:
    p = run["proc"]
    return f"selftest exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-4000:]}"


def test_selftest_passes_on_two_hosts(two_host_run):
    assert two_host_run["proc"].returncode == 0, _explain(two_host_run)
    assert "multinode selftest: PASS" in two_host_run["proc"].stdout


def test_each_rank_ran_on_its_own_host_with_its_node_rank(two_host_run):
    report = json.loads((two_host_run["work"] / "probe_report.json").read_text())
    ranks = report["ranks"]
    assert [(r["rank"], r["node_rank"], r["pdsh_host"]) for r in ranks] == [(0, 0, "127.0.0.2"),
                                                                           (1, 1, "127.0.0.3")], ranks
    # The ssh connection each rank came through ended at its own host address.
    assert [r["ssh_server"] for r in ranks] == ["127.0.0.2", "127.0.0.3"], ranks
    # The training ranks themselves: each logs one start-up line on every rank
    # (pipeline.distributed.rank_banner), which pdsh prefixes with the host it
    # came from. Global rank, node rank from DeepSpeed's node launcher, the host
    # name the rank sees and the rendezvous it joined, per rank.
    log = (two_host_run["work"] / "train.log").read_text()
    banner = re.compile(r"^(?P<pdsh>\S+): .*\brank (?P<rank>\d+)/(?P<world>\d+): node (?P<node>\S+)/(?P<nodes>\S+) "
                        r"\((?P<src>\S+)\), local rank (?P<local>\d+), host (?P<host>\S+), pid (?P<pid>\d+), "
                        r"rendezvous (?P<rdv>\S+), backend (?P<backend>\S+)\s*$")
    seen = sorted((m.groupdict() for m in map(banner.match, log.splitlines()) if m), key=lambda g: g["rank"])
    assert len(seen) == 2, f"expected one start-up line per rank, found {seen}"
    hostname = socket.gethostname()  # both loopback "hosts" are this machine
    for rank, (pdsh_host, g) in enumerate(zip(("127.0.0.2", "127.0.0.3"), seen)):
        assert (g["pdsh"], g["rank"], g["world"], g["node"], g["nodes"], g["src"], g["local"], g["host"],
                g["backend"]) == (pdsh_host, str(rank), "2", str(rank), "2", "CROSS_RANK/CROSS_SIZE", "0",
                                  hostname, "gloo"), g
        assert g["rdv"].startswith("127.0.0.2:"), g
    assert seen[0]["rdv"] == seen[1]["rdv"] and seen[0]["pid"] != seen[1]["pid"], seen


def test_rendezvous_used_the_first_hostfile_host(two_host_run):
    report = json.loads((two_host_run["work"] / "probe_report.json").read_text())
    assert report["master_addr"] == "127.0.0.2"
    assert {(r["master_addr"], r["world_size"]) for r in report["ranks"]} == {("127.0.0.2", 2)}


def test_wandb_and_hf_variables_reached_the_second_node(two_host_run):
    work = two_host_run["work"]
    assert not (work / ".deepspeed_env").exists()  # removed at the end (it was mode 0600)
    report = json.loads((work / "probe_report.json").read_text())
    second = next(r for r in report["ranks"] if r["pdsh_host"] == "127.0.0.3")
    env = two_host_run["env"]
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_RUN_GROUP", "HF_HOME", "HF_HUB_OFFLINE", "DS_ACCELERATOR"):
        assert second["env"].get(name) == env[name], (name, second["env"])
    # Only the file carried them: a variable of the launching shell did not arrive.
    assert second["caller_only"] is None
    assert "WANDB_API_KEY" not in report["forwarded"] and "HF_TOKEN" not in report["forwarded"]


def test_no_secret_in_any_file_log_or_output(two_host_run):
    """probe.log and train.log hold DeepSpeed's pdsh command lines with their exports."""
    leaks = [str(p) for p in two_host_run["work"].rglob("*") if p.is_file() and not p.is_symlink()
             and any(s.encode() in p.read_bytes() for s in (FAKE_KEY, FAKE_TOKEN))]
    proc = two_host_run["proc"]
    leaks += [s for s in (FAKE_KEY, FAKE_TOKEN) if s in proc.stdout or s in proc.stderr]
    assert not leaks, leaks
    assert "pdsh" in (two_host_run["work"] / "train.log").read_text()  # the command lines were logged


def test_a_blank_line_in_deepspeed_env_stops_the_launch(loopback_cluster, tmp_path):
    """Why the file must have no blank line: DeepSpeed splits every line on '='."""
    (tmp_path / ".deepspeed_env").write_text("WANDB_MODE=offline\n\nHF_HUB_OFFLINE=1\n")
    (tmp_path / "noop.py").write_text("print('ran')\n")
    proc = subprocess.run([deepspeed_executable(), *loopback_cluster.launcher_args(), "--master_port", "29999", "noop.py"],
                          cwd=tmp_path, env=loopback_cluster.env(cpu_env()), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "ran" not in proc.stdout
    assert "ValueError" in proc.stderr, proc.stderr[-2000:]


def _fp32_state(ckpt_dir: Path, tag: str) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def test_checkpoint_equals_a_one_node_two_rank_run(two_host_run, reference_run, job):
    assert two_host_run["proc"].returncode == 0, _explain(two_host_run)
    multi_out, single_out = two_host_run["work"] / "train", reference_run["out"]
    multi = json.loads((multi_out / "train_summary.json").read_text())
    single = json.loads((single_out / "train_summary.json").read_text())
    tag = f"global_step{job.steps}"
    assert multi["final_checkpoint"] == single["final_checkpoint"] == tag
    a = _fp32_state(Path(multi["checkpoint_dir"]), tag)
    b = _fp32_state(Path(single["checkpoint_dir"]), tag)
    assert sorted(a) == sorted(b) and a
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-5, f"largest parameter difference between the two-host and one-node runs: {worst}"
    # ... after the same losses at the same steps.
    m_multi, m_single = job.metrics(multi_out), job.metrics(single_out)
    assert [r["step"] for r in m_multi] == [r["step"] for r in m_single] == list(range(1, job.steps + 1))
    for x, y in zip(m_multi, m_single):
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-4, abs=1e-5), (x["step"], x, y)
