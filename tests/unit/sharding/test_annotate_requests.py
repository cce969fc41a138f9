"""`fakereasoning-annotate requests`: Batch JSONL lines, custom_id layout and
collisions, real MIME types, cutting by count and bytes, --max-side, dry run,
prompt files, and the direct mode's journal handling (no server needed)."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the helper importable
from _annotate_fixtures import write_images  # noqa: E402
from sharding.annotate.cli import main  # noqa: E402
from sharding.annotate.direct import read_journal, request_files  # noqa: E402
from sharding.annotate.media import image_tokens  # noqa: E402
from sharding.annotate.prompts import PromptError, load_prompts  # noqa: E402
from sharding.annotate.requests import AnnotateError, RequestsConfig, build_requests  # noqa: E402
from sharding.schema import AUTHENTICITY_ATTRIBUTES, FORGERY_ATTRIBUTES  # noqa: E402


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _image_of(line: dict) -> tuple[str, bytes]:
    url = line["body"]["messages"][0]["content"][1]["image_url"]["url"]
    head, data = url.split(",", 1)
    return head, base64.b64decode(data)


def test_request_lines_are_batch_format_with_real_mime_and_custom_ids(tmp_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, 2)
    # a JPEG named .png and a WebP in a subfolder: the MIME type comes from the content
    buf = io.BytesIO()
    Image.new("RGB", (10, 10), "red").save(buf, "JPEG")
    (imgs / "liar.png").write_bytes(buf.getvalue())
    (imgs / "sub").mkdir()
    Image.new("RGB", (12, 9), "blue").save(imgs / "sub" / "w.webp", "WEBP")
    s = build_requests(RequestsConfig(str(imgs), 1, "mygen", str(tmp_path / "req"), model="m1", max_tokens=77,
                                      progress=False))
    assert (s.images_seen, s.requests, len(s.files), s.skipped) == (4, 4, 1, [])
    lines = _lines(tmp_path / "req" / "mygen.1_fake.00000.jsonl")
    assert [x["custom_id"] for x in lines] == ["mygen/1_fake/img0.png", "mygen/1_fake/img1.png",
                                               "mygen/1_fake/liar.png", "mygen/1_fake/w.webp"]
    for x in lines:
        assert set(x) == {"custom_id", "method", "url", "body"}
        assert (x["method"], x["url"], x["body"]["model"], x["body"]["max_tokens"]) == (
            "POST", "/v1/chat/completions", "m1", 77)
        text = x["body"]["messages"][0]["content"][0]["text"]
        assert all(a in text for a in FORGERY_ATTRIBUTES) and not any(a in text for a in AUTHENTICITY_ATTRIBUTES)
    heads = [_image_of(x)[0] for x in lines]
    assert heads == ["data:image/png;base64", "data:image/png;base64", "data:image/jpeg;base64",
                     "data:image/webp;base64"]
    assert _image_of(lines[2])[1] == (imgs / "liar.png").read_bytes()  # sent unchanged
    index = _lines(tmp_path / "req" / "mygen.1_fake.index.jsonl")
    assert index[3]["path"] == str(imgs / "sub" / "w.webp")
    assert index[3]["sha256"] == hashlib.sha256((imgs / "sub" / "w.webp").read_bytes()).hexdigest()
    assert {e["prompt_version"] for e in index} == {"mmfr-annotate-v1"}


def test_real_label_uses_the_authenticity_prompt(tmp_path):
    write_images(tmp_path / "r", 1)
    build_requests(RequestsConfig(str(tmp_path / "r"), 0, "g", str(tmp_path / "req"), progress=False))
    (line,) = _lines(tmp_path / "req" / "g.0_real.00000.jsonl")
    assert line["custom_id"] == "g/0_real/img0.png"
    text = line["body"]["messages"][0]["content"][0]["text"]
    assert all(a in text for a in AUTHENTICITY_ATTRIBUTES) and '"Answer": "The image is real."' in text


def test_two_images_with_one_custom_id_are_an_error(tmp_path, capsys):
    write_images(tmp_path / "imgs" / "a", 1)
    write_images(tmp_path / "imgs" / "b", 1)
    with pytest.raises(AnnotateError, match=r"a/img0.png.*both map to custom_id 'g/1_fake/img0.png'|"
                                            r"b/img0.png and .*a/img0.png both map"):
        build_requests(RequestsConfig(str(tmp_path / "imgs"), 1, "g", str(tmp_path / "req"), progress=False))
    assert not list((tmp_path / "req").iterdir())  # nothing half-written is left
    rc = main(["requests", "--images", str(tmp_path / "imgs"), "--label", "fake", "--generator", "g",
               "--out", str(tmp_path / "req"), "--no-progress"])
    assert rc == 2 and "both map to custom_id" in capsys.readouterr().err


def test_files_are_cut_by_count_and_by_bytes_and_a_rerun_replaces_them(tmp_path):
    write_images(tmp_path / "imgs", 7)
    out = tmp_path / "req"
    s = build_requests(RequestsConfig(str(tmp_path / "imgs"), 1, "g", str(out), max_requests_per_file=3,
                                      progress=False))
    assert [f.requests for f in s.files] == [3, 3, 1]
    one = s.files[0].bytes // 3 + 200  # one line and a bit: every file then holds a single request
    s = build_requests(RequestsConfig(str(tmp_path / "imgs"), 1, "g", str(out), max_bytes_per_file=2 * one,
                                      progress=False))
    assert all(f.bytes <= 2 * one for f in s.files) and sum(f.requests for f in s.files) == 7
    assert sorted(p.name for p in out.glob("g.1_fake.0*.jsonl")) == [f.name for f in s.files]
    for f in s.files:
        assert (out / f.name).stat().st_size == f.bytes
    # a request that cannot fit any file is skipped and listed
    s = build_requests(RequestsConfig(str(tmp_path / "imgs"), 1, "g", str(out), max_bytes_per_file=100,
                                      progress=False))
    assert s.requests == 0 and {x["reason"] for x in s.skipped} == {"too_large"}
    s = build_requests(RequestsConfig(str(tmp_path / "imgs"), 1, "g", str(out), progress=False))
    assert sorted(p.name for p in out.glob("g.1_fake.*.jsonl")) == ["g.1_fake.00000.jsonl", "g.1_fake.index.jsonl"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_max_side_downsizes_what_is_sent_only(tmp_path):
    big = tmp_path / "imgs" / "big.jpg"
    big.parent.mkdir()
    Image.new("RGB", (400, 100), (10, 200, 30)).save(big, "JPEG", quality=90)
    before = big.read_bytes()
    build_requests(RequestsConfig(str(big.parent), 1, "g", str(tmp_path / "req"), max_side=80, progress=False))
    (line,) = _lines(tmp_path / "req" / "g.1_fake.00000.jsonl")
    head, sent = _image_of(line)
    assert head == "data:image/jpeg;base64" and Image.open(io.BytesIO(sent)).size == (80, 20)
    (entry,) = _lines(tmp_path / "req" / "g.1_fake.index.jsonl")
    assert (entry["width"], entry["height"], entry["sent_width"], entry["sent_height"], entry["max_side"],
            entry["transformed"]) == (400, 100, 80, 20, 80, "downsized")
    assert big.read_bytes() == before


def test_dry_run_writes_nothing_and_estimates_tokens(tmp_path, capsys):
    write_images(tmp_path / "imgs", 3, size=(1024, 1024))
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG garbage")
    damaged = bytearray((tmp_path / "imgs" / "img0.png").read_bytes())
    damaged[damaged.index(b"IDAT") + 6] ^= 0xFF  # a valid header, a chunk with a bad checksum
    (tmp_path / "imgs" / "damaged.png").write_bytes(bytes(damaged))
    rc = main(["requests", "--images", str(tmp_path / "imgs"), "--label", "fake", "--generator", "g",
               "--out", str(tmp_path / "req"), "--dry-run", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and not (tmp_path / "req").exists()
    assert "DRY RUN" in out and "images seen     5" in out and "requests        3" in out
    assert "~2295 for images" in out  # 3 x 765 (a 1024 px square at detail high)
    assert "broken.png: bad_image" in out and "notes.txt: not_an_image" in out
    assert "damaged.png: bad_image: not a readable image: SyntaxError: broken PNG file" in out


def test_image_token_rule():
    assert image_tokens(5000, 5000, "low") == 85
    assert image_tokens(1024, 1024, "high") == 765  # 768x768 -> 4 tiles
    assert image_tokens(2048, 4096, "high") == 1105  # 1024x2048 -> 768x1536 -> 6 tiles
    assert image_tokens(100, 100, "auto") == 255


def test_prompt_files_are_versioned_and_replaceable(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"version": "lab-2", "fake": "Explain the fake.", "real": "Explain the real."}))
    write_images(tmp_path / "imgs", 1)
    s = build_requests(RequestsConfig(str(tmp_path / "imgs"), 1, "g", str(tmp_path / "req"), prompt=str(p),
                                      progress=False))
    assert s.prompt_version == "lab-2"
    (line,) = _lines(tmp_path / "req" / "g.1_fake.00000.jsonl")
    assert line["body"]["messages"][0]["content"][0]["text"] == "Explain the fake."
    assert _lines(tmp_path / "req" / "g.1_fake.index.jsonl")[0]["prompt_version"] == "lab-2"
    assert load_prompts().version == "mmfr-annotate-v1"
    p.write_text(json.dumps({"version": "a b", "fake": "x", "real": "y"}))
    with pytest.raises(PromptError, match=r"p.json: 'version'"):
        load_prompts(str(p))
    p.write_text(json.dumps({"version": "v", "fake": "x"}))
    with pytest.raises(PromptError, match="'real' must be"):
        load_prompts(str(p))


def test_journal_drops_a_cut_last_line(tmp_path):
    j = tmp_path / "journal.jsonl"
    good = json.dumps({"custom_id": "g/1_fake/a.png", "response": {"status_code": 200}, "error": None})
    bad = json.dumps({"custom_id": "g/1_fake/b.png", "response": None, "error": {"code": "x", "message": "m"}})
    j.write_text(good + "\n" + bad + "\n" + '{"custom_id": "g/1_fa')
    assert read_journal(str(j)) == {"g/1_fake/a.png": False, "g/1_fake/b.png": True}
    assert j.read_text().endswith(bad + "\n")
    with pytest.raises(AnnotateError, match="no request files"):
        request_files((str(tmp_path),))


def test_annotate_imports_nothing_from_modeling_or_pipeline():
    import subprocess

    code = ("import sys, sharding.annotate.cli\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'modeling', 'pipeline', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(Path(__file__).resolve().parents[3]), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"
