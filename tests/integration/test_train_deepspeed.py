"""Training through the real `deepspeed` launcher: 2 ranks, gloo, ZeRO-3, CPU.

Three launcher runs serve every test of this module (the launcher is the
expensive part: ~45 s each on 2 cores):

  A   2N optimizer steps in one run, checkpoint every N, final export
  B1  the same job stopped at step N (loop.stop_at_step) ...
  B2  ... and continued with checkpoint.resume=auto to step 2N

with micro-batch 4 x gradient accumulation 2, on shards of 64/64/22 samples
(one rank reads two shards, the other one), so the runs also cross an epoch
boundary with uneven shards and an accumulation window spanning it.
Nothing is mocked: DeepSpeed, the data stream and W&B (offline) are real, and
the W&B run is read back with W&B's own CLI.
"""
from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.local_run import REPO, run_training
from launch.wandb_readback import read_offline_run

pytestmark = pytest.mark.slow

N = 6
RECIPE = os.path.join(REPO, "launch", "recipes", "tiny-cpu.yaml")
LAUNCH_TIMEOUT = 420
REQUIRED_KEYS = ("train/loss", "train/lm_loss", "train/cpm_loss", "train/cpm_acc", "train/cpm_found_frac", "train/lr",
                 "train/grad_norm", "perf/samples_per_s", "perf/tokens_per_s", "memory/rss_gb")


def _common(shards: Path) -> list[str]:
    return [f"data.train_shards={shards / 'train'}", "data.batch_size=4", "data.num_workers=1",
            "data.shuffle_buffer=50", "loop.global_batch=16", "loop.grad_accum=null", f"loop.max_steps={2 * N}",
            f"checkpoint.every_steps={N}", "checkpoint.keep_last=3", "wandb.mode=offline", "optim.lr=3e-3",
            "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def runs(mmfr_shards, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("train")
    a, b = base / "A", base / "B"
    common = _common(mmfr_shards)
    run_training(RECIPE, common + [f"output_dir={a}"], str(base / "A.log"), timeout=LAUNCH_TIMEOUT)
    run_training(RECIPE, common + [f"output_dir={b}", f"loop.stop_at_step={N}", "checkpoint.export=false"],
                 str(base / "B1.log"), timeout=LAUNCH_TIMEOUT)
    run_training(RECIPE, common + [f"output_dir={b}", "checkpoint.resume=auto"], str(base / "B2.log"),
                 timeout=LAUNCH_TIMEOUT)
    return {"A": a, "B": b, "base": base, "shards": mmfr_shards}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_goes_down(runs):
    m = _metrics(runs["A"])
    assert [r["step"] for r in m] == list(range(1, 2 * N + 1))
    losses = [r["train/loss"] for r in m]
    assert all(math.isfinite(x) for x in losses), losses
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.05, f"loss did not go down: first steps {losses[:3]}, last steps {losses[-3:]}"


def test_each_rank_holds_half_of_the_parameters(runs):
    info = json.loads((runs["A"] / "run_info.json").read_text())
    assert (info["world_size"], info["backend"], info["zero_stage"]) == (2, "gloo", 3)
    # loop.global_batch=16 on 2 ranks of micro-batch 4: accumulation 2, derived.
    assert {k: info[k] for k in ("global_batch", "micro_batch", "grad_accum", "grad_accum_from")} == {
        "global_batch": 16, "micro_batch": 4, "grad_accum": 2, "grad_accum_from": "loop.global_batch"}
    total, per_rank = info["params_total"], info["params_per_rank"]
    assert len(per_rank) == 2
    for n in per_rank:
        assert 0.45 * total <= n <= 0.55 * total, (per_rank, total)
    # Partitions may be padded to a multiple of the world size, never smaller than the model.
    assert total <= sum(per_rank) <= total + 2 * 1024
    # The optimizer states on disk are partitioned too: both ranks' files are about the same size.
    ckpt = runs["A"] / "checkpoints" / f"global_step{2 * N}"
    sizes = [os.path.getsize(ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt") for r in (0, 1)]
    assert max(sizes) < 1.2 * min(sizes), sizes


def test_resume_gives_the_same_losses(runs):
    a, b = _metrics(runs["A"]), _metrics(runs["B"])
    assert [r["step"] for r in b] == list(range(1, 2 * N + 1)), "B1 + B2 must log each step once"
    for ra, rb in zip(a, b):
        for key in ("train/loss", "train/lm_loss", "train/cpm_loss", "train/lr", "train/grad_norm",
                    "train/cpm_acc", "train/samples_seen"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key, ra[key], rb[key])
    log = (runs["base"] / "B2.log").read_text()
    assert f"resumed from {runs['B'] / 'checkpoints' / f'global_step{N}'} at step {N}" in log
    ckpt = runs["B"] / "checkpoints"
    assert (ckpt / "latest_complete").read_text().strip() == f"global_step{2 * N}"
    assert (ckpt / f"global_step{N}" / "COMPLETE").is_file()


def test_uneven_shards_cross_an_epoch_without_hang(runs):
    sizes = json.loads((runs["shards"] / "train" / "sizes.json").read_text())
    assert len(set(sizes.values())) > 1, f"shards should be uneven: {sizes}"
    stream = json.loads((runs["A"] / "run_info.json").read_text())["stream"]
    micro_batches = 2 * N * 2  # steps x grad_accum
    bpe = json.loads((runs["A"] / "run_info.json").read_text())["batches_per_epoch"]
    assert micro_batches > bpe, "the run must cross an epoch boundary"
    assert not stream["resampled"] and len(stream["shards"]) == 3
    last = _metrics(runs["A"])[-1]
    assert last["train/epoch"] > 1.0
    assert last["train/samples_seen"] == micro_batches * 4 * 2


def test_the_cpm_fires_on_the_real_answer_layout(runs):
    # The synthetic answers use the real MMFR layout ("<CONCLUSION> This image is
    # fake. </CONCLUSION>", a minority in other whitespace): every step must find
    # the CPM position in (nearly) every sample, and the prefix the run resolved
    # from the data is the one its export carries for evaluation.
    fracs = [r["train/cpm_found_frac"] for r in _metrics(runs["A"])]
    assert min(fracs) > 0.9, fracs
    assert all(r["train/cpm_loss"] > 0 for r in _metrics(runs["A"]))
    exported = json.loads((runs["A"] / "export" / "merged" / "config.json").read_text())
    assert exported["model"]["cpm"]["answer_prefix"] == "<CONCLUSION> This image is"


def test_wandb_offline_run_has_the_metrics(runs):
    info = json.loads((runs["A"] / "run_info.json").read_text())
    assert info["wandb_mode"] == "offline"
    s = read_offline_run(info["wandb_run_dir"])
    assert s["state"] == "finished" and s["run_id"] == info["wandb_run_id"]
    assert s["step"] == 2 * N
    missing = [k for k in REQUIRED_KEYS if k not in s["summary"]]
    assert not missing, f"W&B summary lacks {missing}: {sorted(s['summary'])}"
    last = _metrics(runs["A"])[-1]
    assert s["summary"]["train/loss"] == pytest.approx(last["train/loss"])
    assert "optim" in json.dumps(s["config"]) and "zero" in json.dumps(s["config"])
    assert '"global_batch": 16' in json.dumps(s["config"]) and '"grad_accum": 2' in json.dumps(s["config"])
    # The resumed job continued the same W&B run: two offline segments, one id.
    segments = sorted(glob.glob(str(runs["B"] / "wandb" / "offline-run-*")))
    assert len(segments) == 2
    ids = {read_offline_run(d)["run_id"] for d in segments}
    assert len(ids) == 1, ids


def test_export_and_zero_to_fp32(runs, tmp_path):
    import torch
    from safetensors.torch import load_file

    from modeling.checkpoints.checkpoint import load_pretrained

    export = runs["A"] / "export"
    trainables = load_file(str(export / "trainable" / "non_lora_trainables.safetensors"))
    assert trainables and all(t.numel() > 0 for t in trainables.values())
    model, tokenizer = load_pretrained(export / "merged")
    assert sum(p.numel() for p in model.parameters()) == json.loads(
        (runs["A"] / "run_info.json").read_text())["params_total"] - sum(
        p.numel() for n, p in load_file(str(export / "trainable" / "adapter_model.safetensors")).items())
    # DeepSpeed's own consolidation script, copied into the checkpoint folder, runs on our checkpoint.
    ckpt = runs["A"] / "checkpoints"
    proc = subprocess.run([sys.executable, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(tmp_path / "fp32"),
                           "--tag", f"global_step{2 * N}"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = glob.glob(str(tmp_path / "fp32" / "*"))
    full: dict = {}
    for f in files:
        full.update(load_file(f) if f.endswith(".safetensors") else torch.load(f, weights_only=True))
    for name, t in trainables.items():
        assert torch.equal(full[name].float(), t.float()), name
