"""What pipeline/distributed/ reads from a ZeRO-3 parameter, and the checkpoint
writers' refusal of one that is not gathered, against real DeepSpeed.

One rank in a subprocess (a process group of its own, so the test process keeps
none): deepspeed.zero.Init partitions a Linear, which leaves the parameter's
data empty on the rank while DeepSpeed records its whole size.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SCRIPT = r"""
import json, torch, deepspeed
from pipeline import distributed as dist
from modeling.checkpoints.tensor_io import CheckpointError, ensure_materialised

torch.distributed.init_process_group("gloo")
with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1,
                                              "zero_optimization": {"stage": 3}}):
    model = torch.nn.Linear(4, 3)
p = model.weight
out = {"partitioned": dist.is_partitioned(p), "full": dist.full_numel(p), "held": p.numel(),
       "totals": dist.partition_numels(model)}
try:
    ensure_materialised(model, ["weight", "bias"])
except CheckpointError as e:
    out["refused"] = str(e)
with deepspeed.zero.GatheredParameters([p, model.bias]):
    ensure_materialised(model, ["weight", "bias"])  # gathered: accepted
    out["held_gathered"] = p.numel()
print("RESULT " + json.dumps(out), flush=True)
torch.distributed.destroy_process_group()  # left to interpreter exit, gloo may abort the process
"""


def test_a_partitioned_parameter_counts_its_whole_size_and_is_refused_by_the_writers():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["partitioned"] and out["full"] == 12 and out["held"] == 0 and out["held_gathered"] == 12
    assert out["totals"][1] == 12 + 3
    assert "weight" in out["refused"] and "bias" in out["refused"] and "gather them first" in out["refused"]
