"""Parameter summary of a preset, built on the meta device (no memory, no weights).

    python -m modeling.costs.summary --preset paper

prints JSON: per component the total, frozen and trainable parameter counts and
their bf16 bytes, plus the totals. LoRA adapters are reported as their own
component ("lora"), separate from the frozen LLM weights ("llm").
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from modeling.config import ModelConfig

COMPONENTS = ("clip_tower", "dino_tower", "clip_projector", "dino_projector", "fusion", "llm",
              "lora")
BF16_BYTES = 2


def _component(name: str) -> str:
    top = name.split(".", 1)[0]
    if top == "llm" and "lora_" in name:
        return "lora"
    return top


def summarize(model: torch.nn.Module) -> dict:
    """Counts per component of an already built model (any device, meta included)."""
    stats = {c: {"total": 0, "trainable": 0, "frozen": 0} for c in COMPONENTS}
    for name, p in model.named_parameters():
        s = stats.setdefault(_component(name), {"total": 0, "trainable": 0, "frozen": 0})
        n = p.numel()
        s["total"] += n
        s["trainable" if p.requires_grad else "frozen"] += n
    total = {k: sum(s[k] for s in stats.values()) for k in ("total", "trainable", "frozen")}
    out = {}
    for c, s in list(stats.items()) + [("total", total)]:
        out[c] = dict(s, **{f"{k}_bf16_bytes": v * BF16_BYTES for k, v in s.items()})
    return out


def build_meta(cfg: ModelConfig):
    """The model with every parameter on the meta device; no tokenizer (CPM unset),
    so `cfg.llm.vocab_size` must be set."""
    from modeling.model import FakeReasoningModel

    if cfg.llm.vocab_size is None:
        raise SystemExit("llm.vocab_size is null: the meta-device summary has no tokenizer to "
                         "size the embeddings; pass --vocab-size")
    with torch.device("meta"):
        return FakeReasoningModel(cfg, tokenizer=None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m modeling.costs.summary",
        description="Print total/frozen/trainable parameter counts and bf16 bytes per component "
                    "of a model preset, built on the meta device (no weights, no memory).")
    ap.add_argument("--preset", choices=("tiny", "paper"), default="paper",
                    help="model preset (default: paper)")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="embedding rows (default: the preset's llm.vocab_size; 32000 for paper)")
    ap.add_argument("--dino-backend", choices=("transformers", "timm"), default=None,
                    help="override model.dino_backend")
    ap.add_argument("--no-lora", action="store_true", help="count a full fine-tune instead of LoRA")
    args = ap.parse_args(argv)
    cfg = ModelConfig.preset(args.preset)
    if args.vocab_size is not None:
        cfg.llm.vocab_size = args.vocab_size
    elif cfg.llm.vocab_size is None:
        cfg.llm.vocab_size = 32000
    if args.dino_backend:
        cfg.dino_backend = args.dino_backend
    if args.no_lora:
        cfg.lora.enabled = False
    cfg.validate()
    model = build_meta(cfg)
    result = {"preset": args.preset, "num_image_tokens": cfg.num_image_tokens,
              "components": summarize(model)}
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
