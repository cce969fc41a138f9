"""benchmarks/gpu_check.sh in its CPU smoke mode (tiny preset): the same script a
lent GPU runs at the paper shape, end to end through the shell wrapper."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modeling.costs import flops
from modeling.config import ModelConfig

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_tiny_cpu_smoke_writes_json_and_prints_the_table(tmp_path):
    out = tmp_path / "results" / "gpu_check.json"
    proc = _run("--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--batch-size", "2",
                "--gen-batch", "16", "--gen-new-tokens", "4", "--peak-tflops", "1.0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["preset"] == "tiny" and report["device"].startswith("cpu")
    assert report["attn_note"] == "flash_attention_2 skipped: not a CUDA device"
    [entry] = report["results"]
    assert entry["attn_implementation"] == "sdpa" and "error" not in entry["build"]
    train, gen = entry["train"], entry["generate"]
    assert train["step_s_median"] > 0 and train["peak_mem_gib"] > 0 and train["loss"] == train["loss"]
    # The FLOPs are modeling.costs.flops' for the batch's shape, and MFU is them over the given peak.
    cfg = ModelConfig.preset("tiny")
    want = flops.step_flops(cfg, vocab_size=train["vocab_size"]).for_lengths([train["seq_len"]] * 2)
    assert train["model_flops_per_step"] == want
    assert train["model_tflops_per_s"] == pytest.approx(want / 1e12 / train["step_s_median"], rel=1e-2)
    assert train["mfu"] == pytest.approx(train["model_tflops_per_s"] / 1.0)
    assert gen["batch_size"] == 16 and gen["new_tokens"] == 4 and gen["tokens_per_s"] > 0
    # The quantized phase (bitsandbytes' CPU backend here): both settings, smaller LLM weights.
    assert [q["bits"] for q in report["quantized"]] == ["8bit", "4bit"]
    for q in report["quantized"]:
        assert "error" not in q, q
        assert q["ratio"] < 0.5 and q["layers"] > 0 and 0.0 <= q["max_abs_dp_fake"] < 0.1
    assert "quantized 8bit: LLM linear" in proc.stdout
    # The plan phase: weights as built plus modeling.costs.memory's activations for the CPU's kernels.
    from modeling.costs.memory import activation_bytes

    plan = train["plan"]
    acts = activation_bytes(cfg, 2, train["seq_len"], True, vocab_size=train["vocab_size"], device="cpu")
    assert plan["activations_gib"] == round(acts / 2**30, 3) and plan["weights_gib"] > 0
    assert plan["predicted_peak_gib"] == pytest.approx(plan["weights_gib"] + plan["activations_gib"], abs=2e-3)
    assert plan["measured_over_predicted"] is None  # a CPU's RSS is not comparable
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["attn", "step", "s", "positions/s"] and "MFU" in lines[0]
    assert "plan GiB" in lines[0]
    assert lines[2].startswith("sdpa ") and "%" in lines[2]
    assert str(out) in proc.stdout


def test_paper_preset_refuses_a_cpu_and_help_lists_the_options(tmp_path):
    proc = _run("--preset", "paper", "--device", "cpu", "--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr
    assert not (tmp_path / "x.json").exists()
    proc = _run("--help")
    assert proc.returncode == 0 and "GPU_CHECK_BUDGET_S" in proc.stdout and "--gen-batch" in proc.stdout
