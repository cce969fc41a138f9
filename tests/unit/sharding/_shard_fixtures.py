"""Tiny MMFR-layout fixtures written with PIL, shared by the sharder unit tests."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

from PIL import Image

from sharding import schema


def image_bytes(fmt: str = "PNG", size=(16, 12), mode: str = "RGB", seed: int = 0, **save) -> bytes:
    """A small image with some structure (so that compressed data is not trivial)."""
    im = Image.new("RGB", size)
    im.putdata([((x * 37 + seed * 11) % 256, (y * 53 + seed) % 256, (x * y + seed * 7) % 256)
                for y in range(size[1]) for x in range(size[0])])
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


def answer(label: int) -> str:
    word = "fake" if label else "real"
    return (f"A test scene. <REASONING>{schema.ATTRIBUTES[0]}: nothing odd.</REASONING> "
            f"<CONCLUSION>This image is {word}.</CONCLUSION>")


def record(rid: str, image: str, label: int) -> dict:
    return {"id": rid, "image": image, "conversations": [
        {"from": "human", "value": "<image>\n" + schema.EVAL_QUESTION},
        {"from": "gpt", "value": answer(label)}]}


def attrs(label: int, seed: int = 0) -> dict:
    names = schema.FORGERY_ATTRIBUTES if label else schema.AUTHENTICITY_ATTRIBUTES
    return {n: (None if (i + seed) % 3 == 0 else f"{n} text {seed}") for i, n in enumerate(names)}


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_mmfr(root: Path, n_train: int = 4, gens=("flux", "dalle3"), n_eval: int = 2) -> dict:
    """Write a valid MMFR layout: n_train fakes + n_train reals, n_eval real + fake per generator.

    Returns {"records": [...], "reasoning": {json relpath: {...}}, "images": {relpath: label}}.
    """
    records, images = [], {}
    reasoning: dict[str, dict] = {"diffusiondb/diffusiondb_reasoning.json": {},
                                  "laion/laion_reasoning.json": {}}
    for i in range(n_train):
        fake = f"diffusiondb/part-000001/fake-{i:03d}.png"
        real = f"laion/00000/{i:09d}.jpg"
        write(root / fake, image_bytes("PNG", seed=i))
        write(root / real, image_bytes("JPEG", seed=100 + i, quality=90))
        images[fake], images[real] = 1, 0
        records.append(record(f"f{i}", fake, 1))
        records.append(record(f"r{i}", real, 0))
        if i == 0:  # an image with two conversations
            records.append(record(f"f{i}b", fake, 1))
        reasoning["diffusiondb/diffusiondb_reasoning.json"][fake] = attrs(1, i)
        reasoning["laion/laion_reasoning.json"][real] = attrs(0, i)
    for g in gens:
        jr = f"evaluation_sets/{g}/{g}_reasoning.json"
        reasoning[jr] = {}
        for i in range(n_eval):
            for label, folder in ((0, "0_real"), (1, "1_fake")):
                rel = f"evaluation_sets/{g}/{folder}/{g}_{label}_{i}.png"
                write(root / rel, image_bytes("PNG", seed=1000 + i + 10 * label))
                images[rel] = label
                reasoning[jr][f"{g}/{folder}/{g}_{label}_{i}.png"] = attrs(label, i)
    for jr, content in reasoning.items():
        write(root / jr, json.dumps(content).encode())
    write(root / "forgery_reasoning_cot.json", json.dumps(records).encode())
    return {"records": records, "reasoning": reasoning, "images": images}


def rewrite_json(root: Path, rel: str, fn) -> None:
    p = root / rel
    p.write_text(json.dumps(fn(json.loads(p.read_text()))))


def tree_bytes(out: Path) -> dict[str, bytes]:
    """All files under out (except the resume state) -> bytes, for byte-identity checks."""
    res = {}
    for dirpath, dirnames, filenames in os.walk(out):
        dirnames[:] = [d for d in dirnames if d != ".sharder"]
        for f in filenames:
            p = Path(dirpath) / f
            res[str(p.relative_to(out))] = p.read_bytes()
    return res
