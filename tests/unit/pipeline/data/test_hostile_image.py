"""A 1 KB PNG that declares 1,000,000 x 1 pixels, through the sharder, the training
loader and the evaluation loader, in a process whose address space is capped
(`resource.setrlimit(RLIMIT_AS)`): each stage names and counts the image and goes
on with the good ones. Padding that image to a square would need 3 TB. (One
subprocess, so that the cap cannot touch the test session: marked slow.)

The same process also feeds a 16384 x 1000 image (inside the default bounds):
its padded square would be 805 MB, more than the cap leaves, so it passes only
because the resize is done before the canvas would exist.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r'''
    import io, json, os, resource, sys, tarfile
    import torch
    from PIL import Image

    from modeling.config import ModelConfig
    from modeling.image_processing import ImageProcessor
    from modeling.tokenization.tokenizer import build_bpe_tokenizer
    from pipeline.data import make_train_loader
    from pipeline.data.config import DataConfig
    from pipeline.evaluation.data import enumerate_items, make_eval_loader
    from sharding import schema
    from sharding.shard_set import SetSpec, ShardOptions, write_shard_sets
    from sharding.tar_writer import ShardSample

    work = sys.argv[1]
    torch.set_num_threads(1)

    def png(size, mode="L", colour=90):
        buf = io.BytesIO()
        Image.new(mode, size, colour).save(buf, format="PNG", optimize=True)
        return buf.getvalue()

    bomb = png((1_000_000, 1))
    wide = png((16384, 1000))
    goods = [png((24, 16), "RGB", (i * 40, 80, 120)) for i in range(3)]
    answer = "<REASONING>plain texture.</REASONING> <CONCLUSION>This image is real.</CONCLUSION>"
    conv = [[{"from": "human", "value": "<image>\nReal or fake?"}, {"from": "gpt", "value": answer}]]
    images = {"bomb.png": bomb, "wide.png": wide, **{f"good{i}.png": g for i, g in enumerate(goods)}}

    def meta(rel):
        return {"relpath": rel, "source": "laion", "split": "train", "label": 0, "generator": "laion",
                "conversations": conv, "record_ids": [rel], "attributes": None, "reference": "",
                "has_reasoning": False}

    # Shards as another tool (or an older sharder) may have written them: no size checks.
    shards = os.path.join(work, "shards")
    os.makedirs(shards)
    with tarfile.open(os.path.join(shards, "shard-000000.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
        for rel, data in images.items():
            key = schema.sample_key(rel)
            m = {**meta(rel), "width": 1, "height": 1, "format": "PNG", "sha256": "0" * 64,
                 "image_ext": "png", "schema": schema.SCHEMA_VERSION}
            for name, payload in ((f"{key}.png", data), (f"{key}.json", json.dumps(m).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    with open(os.path.join(shards, "sizes.json"), "w") as fh:
        json.dump({"shard-000000.tar": len(images)}, fh)

    corpus = ["Real or fake?", answer] * 20
    tokenizer = build_bpe_tokenizer(corpus, os.path.join(work, "tok"), vocab_size=300)
    processor = ImageProcessor(ModelConfig.preset("paper"))  # 336 px, as the released model

    # The cap: what the process has mapped now, plus 600 MB.
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    cap = vm + (600 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    out = {"bomb_bytes": len(bomb)}
    # 1. the sharder
    samples = [ShardSample(schema.sample_key(rel), rel, None, meta(rel), len(data), data, "x")
               for rel, data in images.items()]
    summary = write_shard_sets({"train": SetSpec(samples)}, os.path.join(work, "sharded"),
                               ShardOptions(progress=False))
    manifest = summary.manifests["train"]
    out["sharder"] = {"written": manifest["inputs"]["written"], "rejected": manifest["rejected_by_reason"]}

    # 2. the training loader: every batch is full, the bad sample counted
    cfg = DataConfig(train_shards=shards, batch_size=len(images), num_workers=0, shuffle_buffer=0,
                     group_by_length=False)
    batches = list(make_train_loader(cfg, tokenizer, processor, rank=0, world_size=1, epoch=0))
    out["train"] = {"batches": len(batches), "rows": sum(len(b["keys"]) for b in batches),
                    "bad_samples": sum(int(b["bad_samples"]) for b in batches),
                    "wide_used": any(k == schema.sample_key("wide.png") for b in batches for k in b["keys"])}

    # 3. the evaluation loader: a failure record naming the bound, every other image scored
    items = enumerate_items({"s": shards})
    ev = list(make_eval_loader(items, processor, 2, 0))
    out["eval"] = {"scored": sorted(s["key"] for b in ev for s in b["samples"]),
                   "failures": [f["error"] for b in ev for f in b["failures"]]}
    print("RESULT " + json.dumps(out))
''')


@pytest.mark.slow
def test_a_1kb_million_pixel_wide_png_is_refused_by_name_under_a_memory_cap(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert out["bomb_bytes"] < 4096
    # The sharder names it (and still takes the 16384 x 1000 image, inside the bounds).
    assert out["sharder"] == {"written": 4, "rejected": {"side_too_long": 1}}
    # Training: one bad sample replaced by a spare, the batch full, the wide image trained on.
    assert out["train"]["bad_samples"] == 1 and out["train"]["rows"] == out["train"]["batches"] * 5
    assert out["train"]["wide_used"]
    # Evaluation: the four others scored, the bomb a failure naming the bound.
    assert len(out["eval"]["scored"]) == 4
    assert len(out["eval"]["failures"]) == 1 and "max_side=16384" in out["eval"]["failures"][0]
