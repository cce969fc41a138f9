"""Shared fixtures: a tiny CLIP text model + tokenizer saved to a local directory."""
from __future__ import annotations

import pytest

WORDS = (
    "the image shows smooth natural edges consistent lighting and shadows texture is "
    "irregular blurry anomalous high low quality semantic a cat dog on mat sat fake real"
).split()


def build_tiny_clip(path) -> str:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=16,
    )
    cfg = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, projection_dim=16,
        bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )
    model = CLIPTextModelWithProjection(cfg).eval()
    fast.save_pretrained(str(path))
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def write_eval_shard(d, samples) -> str:
    """One evaluation shard set in `d`: samples = [(relpath, PIL image, label, generator)],
    written as PNG with the sharder's metadata fields that the loader reads."""
    import io
    import json
    from pathlib import Path

    from sharding.schema import sample_key
    from sharding.tar_writer import TarWriter

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    w = TarWriter(str(d / "shard-000000.tar"))
    for relpath, image, label, generator in samples:
        buf = io.BytesIO()
        image.save(buf, "PNG")
        key = sample_key(relpath)
        w.add(f"{key}.png", buf.getvalue())
        w.add(f"{key}.json", json.dumps({"label": label, "generator": generator, "reference": "", "relpath": relpath,
                                         "image_ext": "png"}).encode())
    w.commit()
    (d / "sizes.json").write_text(json.dumps({"shard-000000.tar": len(samples)}))
    return str(d)


@pytest.fixture
def eval_shard():
    """The shard writer above, as a fixture (test modules here are not importable)."""
    return write_eval_shard
