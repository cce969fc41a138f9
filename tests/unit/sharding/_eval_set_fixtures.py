"""Miniature benchmark layouts: tiny images and videos written with PIL / PyAV, and a reader of
`sharding.eval_sets` output that checks every shard's members; shared by the eval_sets tests."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from sharding import schema
from sharding.eval_sets.cli import main as cli_main


def img_bytes(fmt: str = "PNG", color=(200, 10, 10), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def put(root: Path, rel: str, data: bytes) -> bytes:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return data


def read_out(out: Path) -> dict[str, list[tuple[str, bytes, dict]]]:
    """generator set dir -> [(key, image bytes, metadata)], checking member order and sizes.json."""
    sets = {}
    for set_dir in sorted(p for p in out.iterdir() if (p / "manifest.json").exists()):
        manifest = json.loads((set_dir / "manifest.json").read_text())
        sizes = json.loads((set_dir / "sizes.json").read_text())
        samples = []
        for shard in sorted(set_dir.glob("shard-*.tar")):
            with tarfile.open(shard) as tf:
                members = tf.getmembers()
                assert sizes[shard.name] == len(members) // 2
                for img, js in zip(members[::2], members[1::2]):
                    key, ext = img.name.split(".", 1)
                    assert js.name == f"{key}.json" and img.mtime == 0 and img.mode == 0o644
                    meta = json.loads(tf.extractfile(js).read())
                    assert set(schema.METADATA_FIELDS) <= set(meta) and meta["image_ext"] == ext
                    assert key == schema.sample_key(meta["relpath"])
                    samples.append((key, tf.extractfile(img).read(), meta))
        inputs = manifest["inputs"]
        assert inputs["images_seen"] == inputs["written"] + inputs["rejected"] == len(samples) + inputs["rejected"]
        sets[set_dir.name] = (samples, manifest)
    return sets


def run(*argv) -> int:
    return cli_main([*map(str, argv), "--workers", "1", "--no-progress", "--max-samples-per-shard", "3"])


def write_video(path: Path, seconds: float, fps: int, color: tuple[int, int, int]) -> None:
    import av
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for i in range(int(seconds * fps)):
            arr = np.full((32, 32, 3), color, dtype=np.uint8)
            arr[: i % 32, :, 1] = 255  # frames differ from each other
            for packet in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
