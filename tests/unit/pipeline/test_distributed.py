"""Process-group start-up (collective timeout, the per-rank start-up line) and the
DeepSpeed side of universal checkpoints."""
from __future__ import annotations

import datetime
import json
import os
import re
import sys
import types
from pathlib import Path

import torch

from pipeline import distributed as dist
from pipeline.training.config import load_train_config

TINY = str(Path(__file__).resolve().parents[3] / "launch" / "recipes" / "tiny-cpu.yaml")
BANNER = re.compile(r"^rank (\d+)/(\d+): node (\S+)/(\S+) \((\S+)\), local rank (\d+), host (\S+), pid (\d+), "
                    r"rendezvous (\S+):(\S+), backend (\S+)$")


def test_banner_of_a_deepspeed_launched_rank():
    env = {"CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "2", "MASTER_ADDR": "10.0.0.7",
           "MASTER_PORT": "29600", "GROUP_RANK": "9", "SLURM_NODEID": "8"}
    line = dist.rank_banner(dist.DistInfo(rank=3, world_size=4, local_rank=1, backend="nccl"), env,
                            host="gpu-b", pid=4242)
    assert line == ("rank 3/4: node 1/2 (CROSS_RANK/CROSS_SIZE), local rank 1, host gpu-b, pid 4242, "
                    "rendezvous 10.0.0.7:29600, backend nccl")
    assert BANNER.match(line)


def test_banner_falls_back_to_torchrun_and_slurm_variables():
    info = dist.DistInfo(rank=5, world_size=8, local_rank=1, backend="gloo")
    torchrun = dist.rank_banner(info, {"GROUP_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "h0",
                                       "MASTER_PORT": "1"}, host="h1", pid=1)
    assert "node 1/2 (GROUP_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE)" in torchrun
    slurm = dist.rank_banner(info, {"SLURM_NODEID": "3", "SLURM_NNODES": "4"}, host="h3", pid=1)
    assert "node 3/4 (SLURM_NODEID/SLURM_NNODES)" in slurm and "rendezvous ?:?" in slurm
    # Nothing known: unknowns are shown as such, never guessed.
    bare = dist.rank_banner(info, {}, host="h", pid=1)
    assert "node ?/? (-/-)" in bare and BANNER.match(bare)


def test_banner_defaults_to_this_process():
    line = dist.rank_banner(dist.DistInfo(0, 1, 0, "gloo"), {})
    m = BANNER.match(line)
    assert m and int(m.group(8)) == os.getpid() and m.group(7) != "None"


def test_init_distributed_hands_the_configured_timeout_to_deepspeed(monkeypatch):
    """The value of distributed_timeout_s reaches deepspeed.init_distributed as its
    process-group timeout (which bounds every gloo/NCCL collective)."""
    calls = []
    fake_ds = types.SimpleNamespace(init_distributed=lambda **kw: calls.append(kw))
    accel = types.SimpleNamespace(device_name=lambda: "cpu", communication_backend_name=lambda: "gloo")
    fake_accel = types.SimpleNamespace(get_accelerator=lambda: accel)
    monkeypatch.setitem(sys.modules, "deepspeed", fake_ds)
    monkeypatch.setitem(sys.modules, "deepspeed.accelerator", fake_accel)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 1)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")  # recorded, so that what init_distributed sets is undone
        monkeypatch.delenv(k)
    cfg = load_train_config(TINY, ["distributed_timeout_s=20"])
    info = dist.init_distributed(cfg.distributed_timeout_s)
    assert calls == [{"dist_backend": "gloo", "timeout": datetime.timedelta(seconds=20)}]
    assert info == dist.DistInfo(0, 1, 0, "gloo")
    dist.init_distributed()  # the evaluation runner: DeepSpeed's own default
    assert calls[-1] == {"dist_backend": "gloo"}


# --------------------------------------------------------------------------- universal checkpoints

def test_universal_layout_is_recognised(tmp_path):
    """The layout of a real ds_to_universal output (DeepSpeed 0.19.8, ZeRO-3, one
    rank): `zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt` plus the copied model states."""
    uni = tmp_path / "global_step2_universal"
    assert not dist.is_universal_checkpoint(str(uni))
    (uni / "zero" / "0.weight").mkdir(parents=True)
    assert not dist.is_universal_checkpoint(str(uni))  # conversion still running: no model states yet
    (uni / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    assert dist.is_universal_checkpoint(str(uni))
    tag = tmp_path / "global_step2"  # an ordinary ZeRO checkpoint has no zero/ folder
    tag.mkdir()
    (tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    assert not dist.is_universal_checkpoint(str(tag))


def test_universal_load_is_switched_on_in_generated_and_user_configs(tmp_path):
    cfg = load_train_config(TINY, [])
    ds = dist.enable_universal_load(dist.resolve_deepspeed_config(cfg, 1))
    assert ds["checkpoint"] == {"tag_validation": "FAIL", "load_universal": True}
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 3}}))
    cfg = load_train_config(TINY, [f"zero.deepspeed_config={user}"])
    ds = dist.enable_universal_load(dist.resolve_deepspeed_config(cfg, 1))
    assert ds["checkpoint"] == {"load_universal": True}
    assert "load_universal" not in dist.resolve_deepspeed_config(cfg, 1).get("checkpoint", {})



def test_zero3_hooks_see_every_tensor_of_the_model_output():
    """ZeRO-3 wraps a module's output tensors in autograd functions to know when
    its backward runs; it finds them only inside tensors, lists, tuples and dicts
    (otherwise it warns that it cannot see them). FakeReasoningOutput must be one."""
    import torch
    from deepspeed.runtime.zero.utils import apply_to_tensors_only

    from modeling.model import FakeReasoningOutput

    loss = torch.tensor(2.0, requires_grad=True) * 1.0
    out = FakeReasoningOutput(loss=loss, lm_loss=torch.tensor(1.5), cpm_loss=torch.tensor(0.5),
                              p_fake=torch.tensor([0.1, 0.9]), cpm_correct=torch.tensor([True, False]),
                              cpm_found=torch.tensor([True, True]))
    seen = []

    def touch(t):
        seen.append(t)
        return t * 1 if t.dtype.is_floating_point else t.clone()

    warned = []
    result = apply_to_tensors_only(touch, out, warning_msg_fn=lambda v: warned.append(type(v)) or "")
    assert len(seen) == 6 and not warned
    assert result is out and isinstance(result, FakeReasoningOutput)
    assert result.loss is result["loss"] and result.loss is not loss  # the wrapped tensor is the one used
    assert torch.equal(result.p_fake, torch.tensor([0.1, 0.9])) and result.logits is None


def test_an_unpartitioned_parameter_counts_its_own_elements():
    """Without ZeRO-3 a parameter is what it holds (the partitioned case, with real
    DeepSpeed, is tests/integration/test_zero3_params.py)."""
    import torch

    p = torch.nn.Linear(4, 3).weight
    assert not dist.is_partitioned(p) and dist.full_numel(p) == 12
