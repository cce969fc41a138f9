"""A complete tiny evaluation setup for tests, benchmarks and CPU smoke runs.

`build_tiny_setup(root)` writes, from nothing and without network:
  root/mmfr/            a synthetic MMFR dataset (10 evaluation generators)
  root/shards/eval/     its evaluation shard sets (the real sharder)
  root/model/           a tiny-preset FakeReasoning model, exported with export_merged
                        (random weights: answers are mostly unparseable, which is
                        exactly what exercises both conventions)
  root/clip_text/       a tiny CLIP text model + tokenizer for CSS
Everything is deterministic for a given seed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class TinySetup:
    root: str
    shards: str  # the sharder's OUT/eval
    model: str  # export_merged directory
    clip_text: str  # CLIP text model directory
    images: int  # evaluation images in total


def build_tiny_clip_text(out_dir: str, seed: int = 0) -> str:
    """A 2-layer CLIP text model with a word-level tokenizer over the MMFR vocabulary."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

    from sharding.schema import ATTRIBUTES

    words = sorted({w.lower() for a in ATTRIBUTES for w in a.split()} | set(
        "the image is real fake natural unnatural details look shows a scene of and".split()))
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=77)
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=16,
                         bos_token_id=2, eos_token_id=3, pad_token_id=0)
    CLIPTextModelWithProjection(cfg).save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


def build_tiny_model(out_dir: str, seed: int = 0) -> str:
    """The tiny preset with a BPE tokenizer built on the MMFR vocabulary, exported merged."""
    import torch

    from modeling.checkpoints.checkpoint import export_merged
    from modeling.config import ModelConfig
    from modeling.model import FakeReasoningModel
    from modeling.tokenization.tokenizer import build_bpe_tokenizer, demo_corpus
    from sharding.schema import ATTRIBUTES, EVAL_QUESTION

    torch.manual_seed(seed)
    tok = build_bpe_tokenizer(demo_corpus(ATTRIBUTES, [EVAL_QUESTION]), os.path.join(os.path.dirname(os.path.abspath(out_dir)), "tokenizer"),
                              vocab_size=600)
    model = FakeReasoningModel.from_config(ModelConfig.preset("tiny"), tok)
    export_merged(model.eval(), tok, out_dir)
    return out_dir


def build_tiny_setup(root: str, eval_images_per_generator: int = 4, seed: int = 0) -> TinySetup:
    from sharding.shard_set import ShardOptions
    from sharding.synthetic import generate_mmfr

    mmfr, shards = os.path.join(root, "mmfr"), os.path.join(root, "shards")
    generate_mmfr(mmfr, train_images=2, eval_images_per_generator=eval_images_per_generator, seed=seed,
                  image_size=32)
    from sharding.mmfr import scan_mmfr
    from sharding.shard_set import SetSpec, write_shard_sets

    scan = scan_mmfr(mmfr)
    sets = {n: SetSpec(s, scan.rejected.get(n, [])) for n, s in scan.samples.items() if n.startswith("eval/")}
    write_shard_sets(sets, shards, ShardOptions(max_samples_per_shard=3, progress=False))
    model = build_tiny_model(os.path.join(root, "model"), seed)
    clip = build_tiny_clip_text(os.path.join(root, "clip_text"), seed)
    return TinySetup(root, os.path.join(shards, "eval"), model, clip, 10 * eval_images_per_generator)
