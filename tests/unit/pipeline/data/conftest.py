"""Fixtures of the data-stream tests: tiny shard sets written with tarfile in the
CONTRACTS layout (image member then json member per sample, sizes.json next to
the shards), and the real tokenizer and image processor of the tiny preset.
(pytest 9 imports test modules with importlib, so helpers travel as fixtures.)"""
from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from PIL import Image

from sharding.schema import FAKE_CONCLUSION, REAL_CONCLUSION, SCHEMA_VERSION, sample_key

QUESTION = "<image>\nIs this image real or fake?"


def answer(label: int, variant: int, extra: int = 0) -> str:
    """The gpt turn; `extra` filler words lengthen the reasoning (length-grouping tests)."""
    verdict = FAKE_CONCLUSION if label else REAL_CONCLUSION
    filler = " with detail" * extra
    return f"<REASONING>variant {variant} of the reasoning{filler}.</REASONING> <CONCLUSION>{verdict}</CONCLUSION>"


def image_bytes(i: int, ext: str = "png", size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)).save(
        buf, format="PNG" if ext == "png" else "JPEG")
    return buf.getvalue()


def metadata(relpath: str, label: int, n_conv: int, extra=lambda variant: 0) -> dict:
    convs = [[{"from": "human", "value": QUESTION}, {"from": "gpt", "value": answer(label, v, extra(v))}]
             for v in range(n_conv)]
    return {"relpath": relpath, "source": "diffusiondb" if label else "laion", "split": "train",
            "label": label, "generator": "diffusiondb" if label else "laion", "conversations": convs,
            "record_ids": [f"{relpath}#{v}" for v in range(n_conv)], "attributes": None,
            "reference": "", "has_reasoning": False, "width": 20, "height": 12, "format": "PNG",
            "sha256": "0" * 64, "image_ext": "png", "schema": SCHEMA_VERSION}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(root, sizes: list[int], n_conv: int = 3, bad: dict | None = None, extra_words=None) -> str:
    """Write shards of the given sample counts; `bad` maps a global sample number to
    "image" (garbage bytes), "json" (invalid json) or "noconv" (empty list);
    `extra_words(n, label, variant)` gives sample n's answers that many filler
    words (label: n % 2, 1 fake), so answer lengths vary; None: none."""
    bad = bad or {}
    os.makedirs(root, exist_ok=True)
    n = 0
    sizes_json = {}
    for s, count in enumerate(sizes):
        name = f"shard-{s:06d}.tar"
        with tarfile.open(os.path.join(root, name), "w", format=tarfile.USTAR_FORMAT) as tar:
            for _ in range(count):
                relpath = f"{'diffusiondb/p' if n % 2 else 'laion/0'}/img{n:05d}.png"
                key = sample_key(relpath)
                meta = metadata(relpath, n % 2, n_conv,
                                (lambda v, n=n: extra_words(n, n % 2, v)) if extra_words else (lambda v: 0))
                img = image_bytes(n)
                js = json.dumps(meta).encode()
                if bad.get(n) == "image":
                    img = b"not a png at all"
                elif bad.get(n) == "json":
                    js = b"{broken"
                elif bad.get(n) == "noconv":
                    meta["conversations"] = []
                    js = json.dumps(meta).encode()
                _add(tar, f"{key}.png", img)
                _add(tar, f"{key}.json", js)
                n += 1
        sizes_json[name] = count
    with open(os.path.join(root, "sizes.json"), "w") as f:
        json.dump(sizes_json, f)
    return str(root)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from modeling.tokenization.tokenizer import build_bpe_tokenizer

    corpus = [QUESTION.replace("<image>\n", "")] + [answer(l, v, e) for l in (0, 1) for v in range(4) for e in (0, 3)]
    return build_bpe_tokenizer(corpus * 20, tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture(scope="session")
def image_processor():
    from modeling.config import ModelConfig
    from modeling.image_processing import ImageProcessor

    return ImageProcessor(ModelConfig.preset("tiny"))


@pytest.fixture(scope="session")
def shard_writer():
    """write_shards(root, sizes, n_conv=3, bad=None) -> root"""
    return write_shards


@pytest.fixture(scope="session")
def answer_text():
    """answer(label, variant) -> the gpt turn the shards hold"""
    return answer
