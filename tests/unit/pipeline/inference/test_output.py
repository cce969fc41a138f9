"""Output files: the journal merge, resuming keys, superseded errors, csv round trip."""
import json

from pipeline.inference import output


def _rec(i, sha, status="ok", sid="s1", path=None):
    r = {"index": i, "path": path or f"/x/{i}.png", "kind": "image", "status": status, "sha256": sha,
         "settings_id": sid}
    if status == "ok":
        r.update(p_fake=0.25 * (i % 4), verdict="real", threshold=0.5, mode="full", answer="a",
                 sections={"summary": "s", "caption": None, "reasoning": "r", "conclusion": "c"},
                 parse_status="ok", answer_verdict="real", disagree=False)
    else:
        r["reason"] = "not_an_image: x"
    return r


def test_journals_merge_in_input_order_and_dedup(tmp_path):
    out = str(tmp_path / "p.jsonl")
    j0, j1 = output.Journal(out, "a1", 0), output.Journal(out, "a1", 1)
    j0.write([_rec(0, "h0"), _rec(1, "h1")])
    j1.write([_rec(2, "h2"), _rec(3, None, "error")])
    j0.write([_rec(4, "h4"), _rec(1, "h1")])  # a duplicate (e.g. a killed finalize): written once
    j0.close(), j1.close()
    assert output.finalize(out, "jsonl", restart=False) == 5
    got = [json.loads(x) for x in open(out)]
    assert [r["index"] for r in got] == [0, 1, 2, 3, 4]
    assert not output.journal_dir(out).exists()
    assert output.done_hashes(out, "jsonl", "s1") == {"h0", "h1", "h2", "h4"}
    assert output.done_hashes(out, "jsonl", "other-settings") == set()


def test_rerun_keeps_old_records_and_replaces_retried_errors(tmp_path):
    out = str(tmp_path / "p.jsonl")
    j = output.Journal(out, "a1", 0)
    j.write([_rec(0, "h0"), _rec(1, None, "error", path="/x/bad.png")])
    j.close()
    output.finalize(out, "jsonl", restart=False)
    j = output.Journal(out, "a2", 0)
    j.write([_rec(0, "h9", path="/x/bad.png")])  # fixed since: now scored
    j.close()
    output.finalize(out, "jsonl", restart=False)
    got = [json.loads(x) for x in open(out)]
    assert [(r["path"], r["status"]) for r in got] == [("/x/0.png", "ok"), ("/x/bad.png", "ok")]


def test_torn_last_line_is_not_done(tmp_path):
    out = tmp_path / "p.jsonl"
    out.write_text(json.dumps(_rec(0, "h0")) + "\n" + json.dumps(_rec(1, "h1"))[:30])
    assert output.done_hashes(str(out), "jsonl", "s1") == {"h0"}


def test_csv_round_trip_keeps_keys_and_nested_fields(tmp_path):
    out = str(tmp_path / "p.csv")
    video = {**_rec(2, "hv"), "kind": "video", "n_frames": 2,
             "frames": [{"frame": 0, "p_fake": 0.1}, {"frame": 30, "p_fake": 0.3}]}
    j = output.Journal(out, "a1", 0)
    j.write([_rec(0, "h0"), video])
    j.close()
    output.finalize(out, "csv", restart=False)
    assert output.done_hashes(out, "csv", "s1") == {"h0", "hv"}
    j = output.Journal(out, "a2", 0)
    j.write([_rec(5, "h5")])
    j.close()
    output.finalize(out, "csv", restart=False)  # rewrites the old rows through the reader
    rows = list(output.read_records(out, "csv"))
    assert [r["sha256"] for r in rows] == ["h0", "hv", "h5"]
    assert json.loads(rows[1]["frames"])[1]["frame"] == 30 and rows[0]["summary"] == "s"


def test_text_block_flags_disagreement():
    r = {**_rec(0, "h"), "verdict": "fake", "p_fake": 0.9, "answer_verdict": "real", "disagree": True}
    text = output.render([r], "text")
    assert "FAKE" in text and "p(fake)=0.900" in text and "conclusion says real" in text
