"""The plan's activation formula (modeling.costs.memory) against the peak of a real
forward and backward under FakeTensorMode + MemTracker (modeling.costs.fake_step), on
a CPU, without allocating: micro-batch 1 and 8, with and without gradient
checkpointing.

    python benchmarks/plan_check.py --llm-layers 8        # benchmarks/results/plan_check.json (about 100 s a case)
    python benchmarks/plan_check.py --shape reduced       # what tests/unit/modeling/costs/test_memory.py runs
    python benchmarks/plan_check.py                       # all 40 decoder layers: very slow, see below

MemTracker's bookkeeping grows faster than linearly with the model's depth: on a
2-core CPU the paper's widths with 8 of the 40 decoder layers take about 100 s
per case, while one case with all 40 had not finished after 4 CPU minutes (tried twice). The
formula is linear in the layers and its per-layer term matches the fake step
exactly (2, 4 and 8 layers), so the 8-layer run is the paper-shape check: every
width, the vocabulary, the image side, LoRA and 2,048 positions of the recipe.

Prints a table (formula, measured, ratio) and writes JSON (--out, default
benchmarks/results/plan_check.json). The formula is taken for the CPU's kernels
(bf16 dropout masks, the fusion's float32 math attention), which the fake step
runs; the plan prints the CUDA variant.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.config import ModelConfig  # noqa: E402
from modeling.costs.fake_step import measure  # noqa: E402
from modeling.costs.memory import activation_bytes  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "plan_check.json"


def shape_config(shape: str, llm_layers: int | None = None) -> ModelConfig:
    """"paper": the recipe's model (13B LLaMA, ViT-L/14 towers at 336 px, LoRA r=128).
    "reduced": the paper's image tokens, vocabulary, LoRA and fusion heads with a
    1024-wide, two-layer LLM and 256-wide, two-layer towers (the CI shape)."""
    cfg = ModelConfig.preset("paper")
    cfg.dtype = "bfloat16"
    if shape == "reduced":
        cfg.llm.hidden_size, cfg.llm.intermediate_size = 1024, 2816
        cfg.llm.num_heads = cfg.llm.num_kv_heads = 8
        cfg.llm.num_layers = 2
        for tower in (cfg.clip, cfg.dino):
            tower.hidden_size, tower.intermediate_size, tower.num_layers = 256, 512, 2
        cfg.clip.select_layer = -1
    elif shape != "paper":
        raise ValueError(f"shape {shape!r}: paper or reduced")
    if llm_layers is not None:
        cfg.llm.num_layers = llm_layers
    return cfg


def check(cfg: ModelConfig, micro_batch: int, positions: int, ckpt: bool) -> dict:
    t0 = time.perf_counter()
    peak = measure(cfg, micro_batch, positions, ckpt)
    formula = activation_bytes(cfg, micro_batch, positions, ckpt, device="cpu")
    return {"micro_batch": micro_batch, "gradient_checkpointing": ckpt, "positions": positions,
            "formula_bytes": formula, "measured_bytes": peak.step, "ratio": formula / peak.step,
            "measured_by_category": peak.by_category, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--shape", choices=("paper", "reduced"), default="paper")
    ap.add_argument("--llm-layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--positions", type=int, default=2048, help="LLM positions per sample (default 2048)")
    ap.add_argument("--micro-batches", default="1,8", help="comma-separated (default 1,8)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = shape_config(args.shape, args.llm_layers)
    report = {"shape": args.shape, "llm_layers": cfg.llm.num_layers, "llm_hidden": cfg.llm.hidden_size,
              "torch": torch.__version__, "machine": platform.machine(), "results": []}
    for mb in (int(x) for x in args.micro_batches.split(",")):
        for ckpt in (False, True):
            r = check(cfg, mb, args.positions, ckpt)
            report["results"].append(r)
            print(f"micro-batch {mb:2d}  checkpointing {'on ' if ckpt else 'off'}  formula "
                  f"{r['formula_bytes'] / 2**30:8.3f} GiB  fake step {r['measured_bytes'] / 2**30:8.3f} GiB  "
                  f"ratio {r['ratio']:.4f}  ({r['seconds']} s)", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    worst = max(abs(r["ratio"] - 1) for r in report["results"])
    print(f"{args.shape} shape, {cfg.llm.num_layers} LLM layers, {args.positions} positions: largest |ratio - 1| "
          f"{worst:.2%}; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
