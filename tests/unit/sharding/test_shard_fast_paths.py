"""The sharder's speed-ups give exactly what the plain code gave.

Each fast path (shard size estimate, directory walk, joined tar writes, lazy
imports, PIL plugin pre-import, fork pool with inherited jobs) is checked
against a straightforward reference, so that a speed-up cannot silently
change the plan, the bytes or the validation.
"""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from collections import OrderedDict
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the helper importable
from _shard_fixtures import image_bytes, make_mmfr, tree_bytes, write  # noqa: E402
from sharding import mmfr  # noqa: E402
from sharding.images import BadImage, inspect_image, read_image_bytes  # noqa: E402
from sharding.mmfr import scan_mmfr  # noqa: E402
from sharding.shard_set import SetSpec, ShardOptions, _approx_len, write_shard_sets  # noqa: E402
from sharding.tar_writer import RECORD, StrictError, TarWriter  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


def _approx_len_reference(obj) -> int:
    """The estimate's definition (the code before the fast path)."""
    if isinstance(obj, str):
        return len(obj) + 3
    if isinstance(obj, dict):
        return sum(len(k) + 4 + _approx_len_reference(v) for k, v in obj.items()) + 2
    if isinstance(obj, (list, tuple)):
        return sum(_approx_len_reference(v) + 1 for v in obj) + 2
    return 8


class _Str(str):
    pass


@pytest.mark.parametrize("obj", [
    "", "abc", "ü€", 0, 1.5, None, True, [], {}, (), ("a", 1), [None, "x", ["y", {"z": "w"}]],
    {"conversations": [[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a" * 300}]],
     "attributes": None, "label": 1, "has_reasoning": False, "record_ids": ["1", "2"]},
    OrderedDict(a="b", c=[1, 2]), _Str("sub"), {"k": _Str("v"), "t": ("x", ["y"])}, [_Str("s"), ("u",)],
])
def test_estimate_fast_path_equals_definition(obj):
    assert _approx_len(obj) == _approx_len_reference(obj)


def _walk_reference(root: str, sub: str) -> list[str]:
    """The os.walk version the scanner used before."""
    out = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, sub)):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
        out.extend(f"{rel}/{f}" for f in filenames)
    return sorted(out)


def test_walk_equals_os_walk_with_links(tmp_path):
    root = tmp_path / "r"
    for rel in ("a/x.png", "a/b/y.jpg", "a/b/c/z.webp", "a/ü name.png", "other/o.png"):
        write(root / rel, b"1")
    os.symlink(root / "other", root / "a/linked_dir")  # listed by neither: not descended, not a file
    os.symlink(root / "other/o.png", root / "a/linked_file.png")
    os.symlink(root / "nowhere.png", root / "a/broken.png")
    entries: dict = {}
    got = mmfr._walk(str(root), "a", entries)
    assert got == _walk_reference(str(root), "a")
    assert "a/linked_file.png" in got and "a/broken.png" in got and not any("linked_dir" in g for g in got)
    assert mmfr._walk(str(root), "absent", {}) == _walk_reference(str(root), "absent") == []
    # The entry's stat follows links, like os.stat; a broken link is "not a file".
    assert mmfr._stat(str(root), "a/linked_file.png", entries)[0] == 1
    assert mmfr._stat(str(root), "a/broken.png", entries) is None
    st = os.stat(root / "a/x.png")
    assert mmfr._stat(str(root), "a/x.png", entries) == (1, f"1:{st.st_mtime_ns}")


def test_joined_writes_equal_tarfile(tmp_path):
    small, big = os.urandom(1000), os.urandom(TarWriter.JOIN_LIMIT + 5)
    members = [("k1.png", small), ("k1.json", b"{}"), ("k2.png", big), ("k2.json", b'{"a":1}'),
               ("k3.png", b""), ("k3.json", bytes(512))]
    w = TarWriter(str(tmp_path / "w.tar"))
    w.add_members(members[:4])
    w.add(*members[4])
    w.add(*members[5])
    sha = w.commit()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            info.uname = info.gname = ""
            tf.addfile(info, io.BytesIO(data))
    written = (tmp_path / "w.tar").read_bytes()
    assert written == buf.getvalue() and len(written) % RECORD == 0
    assert sha == hashlib.sha256(written).hexdigest() and w.size == len(written)


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                          env=env, cwd=REPO).stdout


def test_cli_start_up_imports_no_pil_tqdm_or_multiprocessing():
    out = _python("import sys, sharding.shard_mmfr\n"
                  "print(sorted(m for m in ('PIL', 'tqdm', 'multiprocessing', 'tarfile') if m in sys.modules))")
    assert out.strip() == "[]"


def test_webp_opens_without_loading_every_pil_plugin(tmp_path):
    data = image_bytes("WEBP", size=(20, 10))
    (tmp_path / "x.webp").write_bytes(data)
    code = ("import sys\nfrom sharding.images import inspect_image\n"
            f"print(inspect_image(open({str(tmp_path / 'x.webp')!r}, 'rb').read()))\n"
            "print('PIL.PsdImagePlugin' in sys.modules)")  # loaded only by PIL's init()
    assert _python(code).split("\n")[:2] == ["ImageInfo(width=20, height=10, format='WEBP')", "False"]


def test_formats_without_magic_still_go_through_every_plugin():
    buf = io.BytesIO()
    Image.new("RGB", (7, 5), (1, 2, 3)).save(buf, format="TGA")  # no magic bytes: needs PIL's init()
    info = inspect_image(buf.getvalue())
    assert (info.width, info.height, info.format) == (7, 5, "TGA")
    with pytest.raises(BadImage) as exc:
        inspect_image(b"RIFF\0\0\0\0WEBPVP8 broken")  # WebP magic, broken: the old verdict
    assert exc.value.reason in ("not_an_image", "truncated", "corrupt")


def test_read_image_bytes_directory_and_exact_bytes(tmp_path):
    with pytest.raises(BadImage) as exc:
        read_image_bytes(str(tmp_path))
    assert exc.value.reason == "missing"
    data = os.urandom(200_001)
    (tmp_path / "f.png").write_bytes(data)
    assert read_image_bytes(str(tmp_path / "f.png")) == data


@pytest.mark.slow
def test_fork_pool_strict_error_names_the_file_and_leaves_no_temp(tmp_path):
    make_mmfr(tmp_path / "mmfr", n_train=6, gens=("flux",), n_eval=2)
    bad = "laion/00000/000000003.jpg"
    write(tmp_path / "mmfr" / bad, b"\xff\xd8\xff\xe0 broken")
    scan = scan_mmfr(str(tmp_path / "mmfr"))
    sets = {n: SetSpec(s, scan.rejected.get(n, [])) for n, s in scan.samples.items()}
    opts = ShardOptions(max_samples_per_shard=2, workers=2, progress=False, strict=True)
    with pytest.raises(StrictError, match=bad):
        write_shard_sets(sets, str(tmp_path / "out"), opts)
    # Without strict, the fork pool's output equals a 1-worker run's (the bad image skipped).
    for w in (1, 2):
        write_shard_sets(sets, str(tmp_path / f"o{w}"), ShardOptions(max_samples_per_shard=2, workers=w,
                                                                      progress=False))
    assert tree_bytes(tmp_path / "o1") == tree_bytes(tmp_path / "o2")
