"""One training micro-step of the FakeReasoning model: sdpa vs eager attention.

    python benchmarks/gpu_paper_step.py                    # paper preset, bf16, one GPU
    python benchmarks/gpu_paper_step.py --preset tiny      # CPU smoke check

Builds the model with random weights directly on the device (no checkpoint
needed), feeds a synthetic micro-batch (default 8) of full training sequences
(image tokens + prompt + a long answer ending in the CPM conclusion), and times
forward+backward (no optimizer step) for each attention backend, applied to the
two towers and the LLM. Prints JSON: per backend the median step time, the peak
GPU memory and the loss; with --out also writes it to a file (e.g. under
benchmarks/results/). benchmarks/gpu_check.sh builds on these pieces (MFU,
flash-attn when it imports, generation speed).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.config import ModelConfig  # noqa: E402
from modeling.model import FakeReasoningModel  # noqa: E402
from modeling.template import build_training_example  # noqa: E402
from modeling.tokenization.tokenizer import build_bpe_tokenizer, demo_corpus  # noqa: E402
from modeling.vision import torch_dtype  # noqa: E402

QUESTION = ("Is this image real or fake? Please describe the image, reasoning step-by-step and "
            "conclude with 'this image is real' or 'this image is fake'.")
SENTENCE = ("The lighting on the left side of the face does not match the shadows cast by the "
            "window, and the texture of the hair blends unnaturally into the background. ")


def make_tokenizer():
    """A small BPE tokenizer of the benchmark texts (the LLM's vocabulary size comes
    from the preset; a random-init model's speed does not depend on the words)."""
    with tempfile.TemporaryDirectory() as tmp:
        return build_bpe_tokenizer(demo_corpus([SENTENCE], [QUESTION]), tmp, vocab_size=600)


def synthetic_batch(tok, cfg: ModelConfig, batch_size: int, text_len: int, device):
    """Right-padded batch whose text part is about `text_len` tokens, answer ending in
    '<CONCLUSION>This image is fake.</CONCLUSION>' so the CPM position exists."""
    answer_body = SENTENCE
    while True:
        answer = f"<REASONING>{answer_body}</REASONING>\n<CONCLUSION>This image is fake.</CONCLUSION>"
        ex = build_training_example(tok, QUESTION, answer)
        if len(ex.input_ids) >= text_len or len(answer_body) > 200_000:
            break
        answer_body += SENTENCE
    ids = torch.tensor([ex.input_ids] * batch_size, device=device)
    labels = torch.tensor([ex.labels] * batch_size, device=device)
    g = torch.Generator().manual_seed(0)
    s = cfg.image_size
    return dict(pixel_values=torch.randn(batch_size, 3, s, s, generator=g).to(device),
                input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                forgery_labels=torch.ones(batch_size, dtype=torch.long, device=device))


def build_variant(cfg: ModelConfig, tok, attn: str, device, grad_ckpt: bool,
                  cast_dtype: bool = False) -> tuple[FakeReasoningModel, float]:
    """The model with `attn` on both towers and the LLM, built on `device` (random
    weights); returns it and the seconds the build took. cast_dtype: every
    parameter in cfg.dtype, LoRA adapters included, as DeepSpeed's bf16/fp16
    mode holds them (peft alone keeps the adapters in float32)."""
    for part in (cfg.clip, cfg.dino, cfg.llm):
        part.attn_implementation = attn
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = FakeReasoningModel.from_config(cfg, tok)
    if cast_dtype:
        model.to(torch_dtype(cfg.dtype))
    if grad_ckpt:
        model.enable_gradient_checkpointing()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return model, time.perf_counter() - t0


def time_train_steps(model, batch: dict, warmup: int, steps: int, device) -> tuple[list[float], float]:
    """Seconds of each timed forward+backward (no optimizer step) after `warmup`
    untimed ones, and the last loss."""
    model.train()
    times, loss = [], float("nan")
    for step in range(warmup + steps):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        out = model(**batch)
        out.loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - t)
        loss = float(out.loss.detach())
        del out
    model.zero_grad(set_to_none=True)
    return times, loss


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_variant(cfg: ModelConfig, tok, attn: str, args, device) -> dict:
    model, build_s = build_variant(cfg, tok, attn, device, args.grad_ckpt)
    batch = synthetic_batch(tok, cfg, args.batch_size, args.text_len, device)
    seq_len = batch["input_ids"].shape[1] - 1 + cfg.num_image_tokens
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = time_train_steps(model, batch, args.warmup, args.steps, device)
    result = {
        "attn_implementation": attn,
        "build_s": round(build_s, 2),
        "step_s_median": round(statistics.median(times), 4),
        "step_s_all": [round(x, 4) for x in times],
        "tokens_per_s": round(args.batch_size * seq_len / statistics.median(times), 1),
        "seq_len": seq_len,
        "loss": loss,
        "peak_mem_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                         if device.type == "cuda" else None),
    }
    del model, batch
    free(device)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("paper", "tiny"), default="paper")
    ap.add_argument("--batch-size", type=int, default=8, help="micro-batch (paper: 8 per GPU)")
    ap.add_argument("--text-len", type=int, default=None,
                    help="text tokens per sample before the image is spliced in "
                         "(default: 1400 for paper -> ~2k positions, 64 for tiny)")
    ap.add_argument("--attn", default="sdpa,eager", help="comma-separated backends to compare")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per backend")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per backend")
    ap.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false",
                    help="disable LLM activation checkpointing (the paper recipe uses it)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    cfg = ModelConfig.preset(args.preset)
    if args.preset == "paper":
        if not torch.cuda.is_available():
            print("gpu_paper_step: no CUDA device is visible; the paper preset needs one GPU "
                  "(~30 GiB of weights in bf16). Use --preset tiny for a CPU smoke check.",
                  file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
        cfg.dtype = "bfloat16"
    else:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        torch.set_num_threads(min(2, torch.get_num_threads()))
    args.text_len = args.text_len or (1400 if args.preset == "paper" else 64)

    tok = make_tokenizer()
    report = {
        "preset": args.preset, "device": (torch.cuda.get_device_name(device)
                                          if device.type == "cuda" else "cpu"),
        "dtype": cfg.dtype, "batch_size": args.batch_size, "grad_ckpt": args.grad_ckpt,
        "torch": torch.__version__, "results": [],
    }
    for attn in [a.strip() for a in args.attn.split(",") if a.strip()]:
        try:
            report["results"].append(run_variant(cfg, tok, attn, args, device))
        except torch.OutOfMemoryError as e:  # report it and go on with the next backend
            report["results"].append({"attn_implementation": attn, "error": f"OOM: {e}"[:300]})
            gc.collect()
            torch.cuda.empty_cache()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
