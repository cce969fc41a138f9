"""`fakereasoning-annotate collect` on result files in the Batch API's output
format: every rejection reason, strict JSON (a Python expression never runs),
the MMFR layout the sharder reads, conversations, the report, idempotence."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the helper importable
from _annotate_fixtures import answer, result_line, write_images  # noqa: E402
from sharding.annotate.answers import REASONS, Rejected, parse_answer  # noqa: E402
from sharding.annotate.cli import main  # noqa: E402
from sharding.annotate.collect import CollectConfig, collect  # noqa: E402
from sharding.annotate.requests import RequestsConfig, build_requests  # noqa: E402
from sharding.mmfr import scan_mmfr  # noqa: E402
from sharding.schema import AUTHENTICITY_ATTRIBUTES, FORGERY_ATTRIBUTES, conclusion_label  # noqa: E402

G = "newgen"


@pytest.fixture
def req(tmp_path) -> Path:
    """A request folder: 14 fakes img0..img13 and 2 reals img0..img1 of generator newgen."""
    write_images(tmp_path / "fake", 14)
    write_images(tmp_path / "real", 2, start=50)
    for folder, label in (("fake", 1), ("real", 0)):
        build_requests(RequestsConfig(str(tmp_path / folder), label, G, str(tmp_path / "req"), progress=False))
    return tmp_path / "req"


def _fake(i: int) -> str:
    return f"{G}/1_fake/img{i}.png"


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if not p.is_symlink()
                                       else os.readlink(p))
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


def test_every_rejection_reason_is_listed_and_a_python_expression_never_runs(req, tmp_path):
    pwned = tmp_path / "PWNED"
    expression = f"__import__('pathlib').Path({str(pwned)!r}).write_text('ran')"
    lines = [
        result_line(_fake(0), answer(1)),  # kept
        result_line(_fake(1), f"Here is my analysis:\n```json\n{answer(1, Low_Image_Quality=None)}\n```\nThanks."),
        result_line(_fake(2), "Sure! " + answer(1, Semantic_Irrationality="") + " Hope this helps."),
        result_line(_fake(3), error={"code": "server_error", "message": "the model crashed"}),
        result_line(_fake(4), status=400),
        result_line(_fake(5), expression),
        result_line(_fake(6), '{"Answer": "The image is fake.", "Forgery Attributes": {"Low Image Quality": '
                              f'{expression}}}}}'),
        result_line(_fake(7), json.dumps({"Answer": "The image is real.", "Attributes": {
            "High Image Quality": "Looks fine."}})),
        result_line(_fake(8), json.dumps({"Answer": "Cannot determine."})),
        result_line(_fake(9), json.dumps({"Answer": "The image is fake.", "Forgery Attributes": {
            "Colour Cast": "Too blue.", "Low Image Quality": None}})),
        result_line(_fake(10), json.dumps({"Verdict": "fake"})),
        result_line(f"{G}/1_fake/never-requested.png", answer(1)),
        result_line(_fake(11), answer(1)),
        result_line(_fake(13), json.dumps({"Answer": "The image is not fake."})),
        "{this line is cut",
        json.dumps({"id": "x", "response": None}),
        result_line(f"{G}/0_real/img50.png", answer(0, caption=None)),
        result_line(f"{G}/0_real/img51.png", '{"Answer": "The image is real.", "Attributes": NaN}'),
    ]
    results = tmp_path / "batch_output.jsonl"
    results.write_text("\n".join(lines) + "\n")
    (tmp_path / "fake" / "img11.png").unlink()  # image_missing
    # img12 has no result line: no_answer
    out = tmp_path / "mmfr"
    report = collect(CollectConfig((str(results),), (str(req),), str(out)))
    assert not pwned.exists()

    by_id = {r["custom_id"]: r["reason"] for r in report["rejected"] if r["custom_id"]}
    assert by_id == {
        _fake(3): "error_line", _fake(4): "http_status", _fake(5): "not_json", _fake(6): "not_json",
        _fake(7): "label_contradiction", _fake(8): "cannot_determine", _fake(9): "no_attribute",
        _fake(10): "no_verdict", f"{G}/1_fake/never-requested.png": "no_request", _fake(11): "image_missing",
        _fake(12): "no_answer", _fake(13): "no_verdict", f"{G}/0_real/img51.png": "not_json"}
    assert sorted(r["reason"] for r in report["rejected"] if not r["custom_id"]) == ["malformed_line"] * 2
    assert set(by_id.values()) | {"malformed_line"} <= set(REASONS)
    fake, real = ({g["label"]: g for g in report["groups"]}[k] for k in ("1_fake", "0_real"))
    assert (fake["requests"], fake["answers"], fake["kept"]) == (14, 13, 3)
    # every request is kept or rejected (no_request lines are results without a request)
    assert fake["kept"] + fake["rejected_total"] - fake["rejected"]["no_request"] == fake["requests"]
    assert (real["requests"], real["kept"], real["rejected"]) == (2, 1, {"not_json": 1})
    assert fake["attribute_frequency"]["Low Image Quality"] == 2  # img1 gave it null
    assert "other names dropped: ['Colour Cast']" in next(r["detail"] for r in report["rejected"]
                                                         if r["custom_id"] == _fake(9))
    assert fake["tokens"] == {"completion_tokens": 1200, "prompt_tokens": 3600, "total_tokens": 4800}  # 12 lines answered

    ev = out / "evaluation_sets" / G
    reasoning = json.loads((ev / f"{G}_reasoning.json").read_text())
    assert list(reasoning) == [f"{G}/0_real/img50.png", _fake(0), _fake(1), _fake(2)]
    assert reasoning[_fake(1)]["Low Image Quality"] is None and reasoning[_fake(2)]["Semantic Irrationality"] is None
    assert all(list(v) == list(FORGERY_ATTRIBUTES) for k, v in reasoning.items() if "1_fake" in k)
    assert list(reasoning[f"{G}/0_real/img50.png"]) == list(AUTHENTICITY_ATTRIBUTES)
    assert sorted(p.name for p in (ev / "1_fake").iterdir()) == ["img0.png", "img1.png", "img2.png"]
    assert os.readlink(ev / "1_fake" / "img0.png") == str(tmp_path / "fake" / "img0.png")
    assert json.loads((out / "annotate_report.json").read_text()) == report


def test_parse_answer_finds_json_in_prose_and_keeps_known_names_only():
    a = parse_answer('I think:\n{"Answer": "The image is fake.", "Forgery Attributes": {'
                     '"irregular  image edges": "Halos.", "Extra": "x"}} done {"other": 1}', 1)
    assert a.attributes["Irregular Image Edges"] == "Halos." and a.unknown_names == ["Extra"]
    assert list(a.attributes) == list(FORGERY_ATTRIBUTES)
    with pytest.raises(Rejected) as e:
        parse_answer('{"Answer": "The image is fake.", "Forgery Attributes": {"Low Image Quality": Infinity}}', 1)
    assert e.value.reason == "not_json"
    with pytest.raises(Rejected) as e:
        parse_answer("{'Answer': 'The image is fake.'}", 1)  # a Python literal is not JSON
    assert e.value.reason == "not_json"


def test_collect_is_idempotent_and_new_results_add(req, tmp_path, capsys):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("\n".join(result_line(_fake(i), answer(1)) for i in (3, 0)) + "\n")
    # b retries img1 after an error, and holds a worse line for img0 (a kept answer wins)
    second.write_text("\n".join([result_line(_fake(1), error={"code": "timeout", "message": "t"}),
                                 result_line(_fake(1), answer(1, caption="Second try.")),
                                 result_line(_fake(0), status=500)]) + "\n")
    out = tmp_path / "mmfr"
    args = ["collect", str(first), "--requests", str(req), "--out", str(out), "--conversations"]
    assert main(args) == 0
    snap = _tree(out)
    mtime = (out / "evaluation_sets" / G / f"{G}_reasoning.json").stat().st_mtime_ns
    assert main(args) == 0
    assert _tree(out) == snap
    assert (out / "evaluation_sets" / G / f"{G}_reasoning.json").stat().st_mtime_ns == mtime  # not rewritten
    table = capsys.readouterr().out
    assert "newgen     1_fake  14        2        2     12" in table
    assert main(["collect", str(second), "--requests", str(req), "--out", str(out), "--conversations"]) == 0
    reasoning = json.loads((out / "evaluation_sets" / G / f"{G}_reasoning.json").read_text())
    assert list(reasoning) == [_fake(0), _fake(3), _fake(1)]
    cot = json.loads((out / "forgery_reasoning_cot.json").read_text())
    assert [r["id"] for r in cot] == [_fake(0), _fake(3), _fake(1)]
    assert "<CAPTION> Second try. </CAPTION>" in cot[2]["conversations"][1]["value"]
    # collecting both files together gives what collecting them one after the other gave
    out2 = tmp_path / "mmfr2"
    assert main(["collect", str(first), str(second), "--requests", str(req), "--out", str(out2),
                 "--conversations"]) == 0
    assert json.loads((out2 / "evaluation_sets" / G / f"{G}_reasoning.json").read_text()) == reasoning


def test_conversations_follow_the_answer_layout_and_the_sharder_reads_the_output(req, tmp_path):
    results = tmp_path / "out.jsonl"
    results.write_text("\n".join([result_line(_fake(0), answer(1)), result_line(_fake(1), answer(1, caption=None)),
                                  result_line(_fake(2), answer(1, caption=None)),
                                  result_line(f"{G}/0_real/img50.png", answer(0))]) + "\n")
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"img2.png": "A caption from the user's file."}))
    out = tmp_path / "mmfr"
    report = collect(CollectConfig((str(results),), (str(req),), str(out), copy=True, conversations=True,
                                   captions=str(captions)))
    fake = {g["label"]: g for g in report["groups"]}["1_fake"]
    assert (fake["kept"], fake["conversations"], fake["no_caption"]) == (3, 2, 1)
    cot = json.loads((out / "forgery_reasoning_cot.json").read_text())
    by_id = {r["id"]: r for r in cot}
    assert set(by_id) == {f"{G}/0_real/img50.png", _fake(0), _fake(2)}
    text = by_id[_fake(0)]["conversations"][1]["value"]
    assert text.startswith("<SUMMARY> ") and "</SUMMARY> <CAPTION> A plain coloured rectangle. </CAPTION> " \
                                             "<REASONING> Inconsistent Lighting and Shadows: " in text
    assert text.endswith("</REASONING> <CONCLUSION> This image is fake. </CONCLUSION>")
    assert conclusion_label(text) == 1 and conclusion_label(by_id[f"{G}/0_real/img50.png"]["conversations"][1]
                                                            ["value"]) == 0
    assert "A caption from the user's file." in by_id[_fake(2)]["conversations"][1]["value"]
    assert by_id[_fake(0)]["image"] == f"evaluation_sets/{_fake(0)}"
    assert by_id[_fake(0)]["prompt_version"] == "mmfr-annotate-v1"
    assert not (out / "evaluation_sets" / G / "1_fake" / "img0.png").is_symlink()  # --copy

    scan = scan_mmfr(str(out))
    samples = {s.relpath: s.metadata for s in scan.samples[f"eval/{G}"]}
    assert sorted(samples) == sorted(f"evaluation_sets/{c}" for c in (_fake(0), _fake(1), _fake(2),
                                                                       f"{G}/0_real/img50.png"))
    meta = samples[f"evaluation_sets/{_fake(0)}"]
    assert meta["label"] == 1 and meta["has_reasoning"] and meta["generator"] == G
    assert meta["reference"] and len(meta["conversations"]) == 1
    assert [r.reason for r in scan.rejected.get(f"eval/{G}", [])] == []
