"""GPU check of the paper-shape model: training micro-step time per attention
backend, peak memory, MFU, and generation speed. Run it through
benchmarks/gpu_check.sh (which bounds its time); `--preset tiny --device cpu`
is the CPU smoke mode the test suite runs.

For each backend (sdpa, and flash_attention_2 when `import flash_attn` works
and the device is CUDA):
  1. build the model with random weights directly on the device (paper: 13B
     LLaMA, CLIP and DINOv2 ViT-L/14 at 336 px, fusion, LoRA r=128), every
     parameter in bfloat16 as DeepSpeed's bf16 mode holds them;
  2. time forward+backward of a synthetic micro-batch of full training sequences
     (gradient checkpointing on, as in the paper recipe; no optimizer step):
     median step time, LLM positions per second, peak allocated memory, and MFU =
     modeling.costs.flops model FLOPs of the batch / (step time x peak of the device);
     The plan phase records, next to the measured peak, what the plan's
     formulas predict for that step (weights + modeling.costs.memory's activations
     and logits; with the trainable gradients as an upper bound), so the
     first GPU run calibrates `--check --plan`;
  3. generation at batch 16: a short prompt with the image, greedy, exactly
     --gen-new-tokens new tokens (end-of-sequence suppressed), timed after a
     warm-up; tokens/s over all of it and for the decode alone (minus a
     one-token prefill run).
Then, when bitsandbytes imports (the 'quantize' extra), the quantized phase of
`fakereasoning-predict --quantize` for each of --quantize (default 8bit,4bit):
the model built once more in bf16 (same seed, same random weights) scores
--quant-images random images (p(fake) by the forced conclusion forward, as
--detect-only does, and a short greedy answer), then its LLM is quantized in
place (modeling.checkpoints.quantization) and the same images are scored again: LLM
linear-weight bytes before/after, device memory allocated after, the largest
|p(fake) difference|, the share of equal verdicts at 0.5 and of identical answers.
Writes JSON (--out, default benchmarks/results/gpu_check.json) after every
phase, so a run cut short by its time limit keeps what it measured, and prints
a table. A phase that fails (out of memory, a backend that cannot be built) is
recorded with its error and the check goes on.

Paper batch: 8 sequences of about 2k LLM positions (1400 text tokens + 575
image positions) per micro-step, the recipe's data.batch_size, which fits in
80 GB with gradient checkpointing (26 GB of weights, 1 GB of adapters, the
rest activations); --batch-size to change it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_paper_step import (QUESTION, build_variant, free, make_tokenizer,  # noqa: E402
                                       synthetic_batch, time_train_steps)
from modeling.costs import flops as model_flops  # noqa: E402
from modeling.costs import memory as model_memory  # noqa: E402
from modeling.config import ModelConfig  # noqa: E402
from modeling.llm import causal_lm  # noqa: E402
from modeling.template import build_prompt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_check.json"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--preset", choices=("paper", "tiny"), default="paper")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: cuda when visible, else cpu (the paper preset needs cuda)")
    ap.add_argument("--attn", default="auto",
                    help="comma-separated backends; auto: sdpa, plus flash_attention_2 when flash-attn "
                         "imports and the device is CUDA")
    ap.add_argument("--batch-size", type=int, default=8, help="training micro-batch (default 8, the recipe's)")
    ap.add_argument("--text-len", type=int, default=None,
                    help="text tokens per training sequence (default 1400 paper -> ~2k positions, 64 tiny)")
    ap.add_argument("--steps", type=int, default=3, help="timed training micro-steps per backend")
    ap.add_argument("--warmup", type=int, default=1, help="untimed micro-steps per backend")
    ap.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false",
                    help="disable LLM activation checkpointing (the paper recipe uses it)")
    ap.add_argument("--gen-batch", type=int, default=16, help="generation batch (default 16)")
    ap.add_argument("--gen-new-tokens", type=int, default=64, help="new tokens per generated answer")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak TFLOP/s of the device for MFU (default: modeling.costs.flops.PEAK_TFLOPS by the "
                         "CUDA device name; none on CPU)")
    ap.add_argument("--quantize", default="8bit,4bit",
                    help="quantized phase: comma-separated 8bit/4bit, or 'none' (needs bitsandbytes)")
    ap.add_argument("--quant-images", type=int, default=8, help="images scored by the quantized phase (default 8)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="skip phases that would start after this many seconds (gpu_check.sh also kills "
                         "the run a minute later)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    for name in ("batch_size", "steps", "gen_batch", "gen_new_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        ap.error("--peak-tflops must be > 0")
    return args


def pick_device(choice: str) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but no CUDA device is visible")
    return torch.device("cuda", torch.cuda.current_device())


def backends(choice: str, device: torch.device) -> tuple[list[str], str]:
    """The attention backends to measure, and why flash_attention_2 is or is not among them."""
    if choice != "auto":
        return [a.strip() for a in choice.split(",") if a.strip()], "as asked (--attn)"
    if device.type != "cuda":
        return ["sdpa"], "flash_attention_2 skipped: not a CUDA device"
    if importlib.util.find_spec("flash_attn") is None:
        return ["sdpa"], "flash_attention_2 skipped: flash-attn is not installed"
    try:
        import flash_attn  # noqa: F401  - an install that fails to import (ABI mismatch) is skipped too
    except Exception as e:  # noqa: BLE001
        return ["sdpa"], f"flash_attention_2 skipped: import flash_attn failed ({type(e).__name__}: {e})"
    return ["sdpa", "flash_attention_2"], "flash-attn imports"


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # CPU: the process's peak resident set (ru_maxrss is KiB on Linux), whole run so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan_prediction(model, cfg: ModelConfig, batch_size: int, seq_len: int, grad_ckpt: bool, vocab: int,
                    device: torch.device) -> dict:
    """What the plan's formulas predict for this step on one device without ZeRO:
    every weight (as built, in bf16), the activations and logits of modeling.costs.memory
    for this device's kernels, and, as an upper bound, the trainable parameters'
    gradients (the step keeps them; under ZeRO-3 they leave in buckets)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    acts = model_memory.activation_bytes(cfg, batch_size, seq_len, grad_ckpt, vocab_size=vocab,
                                         device="cuda" if device.type == "cuda" else "cpu")
    return {"weights_gib": round(weights / 2**30, 3), "activations_gib": round(acts / 2**30, 3),
            "trainable_grads_gib": round(grads / 2**30, 3),
            "predicted_peak_gib": round((weights + acts) / 2**30, 3),
            "predicted_peak_with_grads_gib": round((weights + acts + grads) / 2**30, 3)}


def measure_training(model, cfg: ModelConfig, tok, args, device, peak_flops: float | None) -> dict:
    batch = synthetic_batch(tok, cfg, args.batch_size, args.text_len, device)
    seq_len = model_flops.llm_positions(batch["input_ids"].shape[1], cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = time_train_steps(model, batch, args.warmup, args.steps, device)
    step_s = statistics.median(times)
    vocab = causal_lm(model.llm).config.vocab_size
    step_flops = model_flops.step_flops(cfg, vocab).for_lengths([seq_len] * args.batch_size)
    achieved = step_flops / step_s
    del batch
    plan = plan_prediction(model, cfg, args.batch_size, seq_len, args.grad_ckpt, vocab, device)
    peak = peak_memory_gib(device)
    # On a GPU the measured peak calibrates the plan; on a CPU the peak is the process's RSS (not comparable).
    plan["measured_over_predicted"] = round(peak / plan["predicted_peak_gib"], 4) if device.type == "cuda" else None
    return {
        "batch_size": args.batch_size, "seq_len": seq_len, "grad_ckpt": args.grad_ckpt,
        "step_s_median": round(step_s, 4), "step_s_all": [round(t, 4) for t in times],
        "positions_per_s": round(args.batch_size * seq_len / step_s, 1),
        "loss": loss, "peak_mem_gib": round(peak, 2), "plan": plan,
        "vocab_size": vocab, "model_flops_per_step": step_flops,
        "model_tflops_per_s": achieved / 1e12,
        "mfu": achieved / peak_flops if peak_flops else None,
    }


def measure_generation(model, cfg: ModelConfig, tok, args, device) -> dict:
    model.eval()
    b, new = args.gen_batch, args.gen_new_tokens
    px = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    px = px.to(device)
    prompts = [QUESTION] * b

    def run(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        # min_new_tokens: random weights would stop at an early end-of-sequence token.
        # use_cache: gradient checkpointing turned the config's cache off for training.
        model.generate(px, prompts, max_new_tokens=n, min_new_tokens=n, use_cache=True)
        sync(device)
        return time.perf_counter() - t

    run(2)  # warm-up: kernels, allocator, caches
    prefill_s = run(1)
    total_s = run(new)
    decode_s = max(total_s - prefill_s, 1e-9)
    model.train()
    return {"batch_size": b, "new_tokens": new,
            "prompt_positions": model_flops.llm_positions(len(build_prompt(tok, QUESTION)[0]), cfg),
            "seconds": round(total_s, 4), "prefill_s": round(prefill_s, 4),
            "tokens_per_s": round(b * new / total_s, 1),
            "decode_tokens_per_s": round(b * (new - 1) / decode_s, 1) if new > 1 else None}


def _llm_linear_bytes(model) -> int:
    from torch import nn

    from modeling.checkpoints.quantization import weight_bytes

    lm = causal_lm(model.llm)
    return sum(weight_bytes(m) for n, m in lm.named_modules()
               if not n.endswith("lm_head") and (type(m) is nn.Linear or type(m).__module__.startswith("bitsandbytes")))


def _score_for_quant(model, px, prompts, new_tokens: int) -> tuple[torch.Tensor, list[str]]:
    with torch.no_grad():
        p = model.score_p_fake(px, prompts).float().cpu()
        answers = model.generate(px, prompts, max_new_tokens=new_tokens, use_cache=True)
    return p, answers


def measure_quantized(cfg: ModelConfig, tok, bits: str, args, device) -> dict:
    """One bits setting of the quantized phase (see the module doc)."""
    from modeling.checkpoints.quantization import quantize_llm

    model, _ = build_variant(cfg, tok, "sdpa", device, grad_ckpt=False, cast_dtype=True)
    model.eval()
    n = args.quant_images
    px = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(2)).to(device)
    prompts = [QUESTION] * n
    p_ref, a_ref = _score_for_quant(model, px, prompts, 16)
    before = _llm_linear_bytes(model)
    replaced = quantize_llm(model, bits)
    free(device)
    after = _llm_linear_bytes(model)
    allocated = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    p_q, a_q = _score_for_quant(model, px, prompts, 16)
    del model
    free(device)
    return {"bits": bits, "layers": replaced, "llm_linear_gib_before": round(before / 2**30, 3),
            "llm_linear_gib_after": round(after / 2**30, 3), "ratio": round(after / before, 4),
            "allocated_gib_after": None if allocated is None else round(allocated, 2),
            "max_abs_dp_fake": float((p_ref - p_q).abs().max()),
            "verdict_agreement": float(((p_ref >= 0.5) == (p_q >= 0.5)).float().mean()),
            "answer_agreement": sum(a == b for a, b in zip(a_ref, a_q)) / n}


def table(report: dict) -> str:
    head = ("attn", "step s", "positions/s", "peak GiB", "plan GiB", "TFLOP/s", "MFU", "gen tok/s", "decode tok/s")
    rows = [head]
    for r in report["results"]:
        t, g = r.get("train") or {}, r.get("generate") or {}
        mfu = t.get("mfu")
        rows.append((r["attn_implementation"], str(t.get("step_s_median", "-")), str(t.get("positions_per_s", "-")),
                     str(t.get("peak_mem_gib", "-")), str((t.get("plan") or {}).get("predicted_peak_gib", "-")),
                     f"{t['model_tflops_per_s']:.4g}" if "model_tflops_per_s" in t else "-",
                     f"{mfu:.1%}" if mfu is not None else "-", str(g.get("tokens_per_s", "-")),
                     str(g.get("decode_tokens_per_s", "-"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in report["results"]:
        for phase in ("build", "train", "generate"):
            if isinstance(r.get(phase), dict) and "error" in r[phase]:
                lines.append(f"{r['attn_implementation']} {phase}: {r[phase]['error']}")
    return "\n".join(lines)


def quantize_phase(report: dict, cfg: ModelConfig, tok, args, device, over_budget, save) -> None:
    """The quantized phase for each of --quantize; recorded under report["quantized"]."""
    wanted = [b.strip() for b in args.quantize.split(",") if b.strip() and b.strip() != "none"]
    if not wanted:
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        report["quantized"] = [{"bits": b, "error": "skipped: bitsandbytes is not installed "
                                "(pip install '.[quantize]')"} for b in wanted]
        return
    report["quantized"] = []
    for bits in wanted:
        if over_budget():
            report["quantized"].append({"bits": bits, "error": f"skipped: past the {args.budget_s:.0f} s budget"})
            continue
        try:
            report["quantized"].append(measure_quantized(cfg, tok, bits, args, device))
        except Exception as e:  # noqa: BLE001 - recorded; the other setting still runs
            report["quantized"].append({"bits": bits, "error": f"{type(e).__name__}: {e}"[:400]})
            free(device)
        save()


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = pick_device(args.device)
    cfg = ModelConfig.preset(args.preset)
    if args.preset == "paper":
        if device.type != "cuda":
            print("gpu_check: the paper preset needs a CUDA device (26 GB of bf16 weights); "
                  "use --preset tiny --device cpu for the smoke mode", file=sys.stderr)
            return 2
        cfg.dtype = "bfloat16"
    elif device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    args.text_len = args.text_len or (1400 if args.preset == "paper" else 64)
    attns, attn_note = backends(args.attn, device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    peak_tflops = args.peak_tflops
    if peak_tflops is None and device.type == "cuda":
        peak_tflops = model_flops.peak_tflops(device_name)
    peak_flops = peak_tflops * 1e12 if peak_tflops else None
    report = {
        "preset": args.preset, "device": device_name, "dtype": cfg.dtype, "torch": torch.__version__,
        "peak_tflops": peak_tflops, "attn_note": attn_note, "budget_s": args.budget_s, "results": [],
        "flops_convention": "modeling.costs.flops: model FLOPs (matmuls, forward + backward, frozen weights without "
                            "weight gradients, full L x L attention, no recomputation)",
    }
    tok = make_tokenizer()

    def save() -> None:
        report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    def over_budget() -> bool:
        return time.perf_counter() - t_start > args.budget_s

    for attn in attns:
        entry: dict = {"attn_implementation": attn}
        report["results"].append(entry)
        if over_budget():
            entry["build"] = {"error": f"skipped: past the {args.budget_s:.0f} s budget"}
            save()
            continue
        model = None
        try:
            model, build_s = build_variant(cfg, tok, attn, device, args.grad_ckpt, cast_dtype=True)
            entry["build"] = {"seconds": round(build_s, 2),
                              "weights_gib": round(sum(p.numel() * p.element_size() for p in model.parameters())
                                                   / 2**30, 3)}
        except Exception as e:  # noqa: BLE001 - record it and go on with the next backend
            entry["build"] = {"error": f"{type(e).__name__}: {e}"[:400]}
        save()
        for phase, fn in (("train", lambda: measure_training(model, cfg, tok, args, device, peak_flops)),
                          ("generate", lambda: measure_generation(model, cfg, tok, args, device))):
            if model is None:
                break
            if over_budget():
                entry[phase] = {"error": f"skipped: past the {args.budget_s:.0f} s budget"}
                continue
            try:
                entry[phase] = fn()
            except Exception as e:  # noqa: BLE001 - an OOM in one phase must not lose the others
                entry[phase] = {"error": f"{type(e).__name__}: {e}"[:400]}
                if model is not None:
                    model.zero_grad(set_to_none=True)
                free(device)
            save()
        del model
        free(device)
    quantize_phase(report, cfg, tok, args, device, over_budget, save)
    save()
    print(table(report))
    for q in report.get("quantized", []):
        print(f"quantized {q.get('bits')}: " + (q["error"] if "error" in q else
              f"LLM linear {q['llm_linear_gib_before']} -> {q['llm_linear_gib_after']} GiB (x{q['ratio']}), "
              f"max |dp_fake| {q['max_abs_dp_fake']:.4f}, verdicts equal {q['verdict_agreement']:.0%}, "
              f"answers equal {q['answer_agreement']:.0%}"))
    print(f"device {device_name}; peak {peak_tflops or '-'} TFLOP/s; {attn_note}; "
          f"{report['elapsed_s']} s; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
