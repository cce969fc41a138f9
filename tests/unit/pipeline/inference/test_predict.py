"""fakereasoning-predict in one process with the tiny model: the same answers and
p(fake) as the evaluation, bad inputs as records with the exit status, resuming,
detect-only, videos, evidence maps, stdin."""
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.inference import cli, output
from pipeline.inference.config import PredictConfig
from pipeline.inference.run import run_predict

GEN = {"max_new_tokens": 8, "num_workers": 0, "progress": False}


def _png(path: Path, size, colour) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    for i, (lab, size) in enumerate([("0_real", (40, 30)), ("1_fake", (30, 50)), ("1_fake", (33, 33)),
                                     ("0_real", (64, 20))]):
        img = Image.fromarray(np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        (root / lab).mkdir(exist_ok=True)
        img.save(root / lab / f"{i}.png")
    return root


def _records(path) -> list[dict]:
    return [json.loads(x) for x in open(path, encoding="utf-8")]


def test_same_answer_and_p_fake_as_the_evaluation(tiny_checkpoint, folder, tmp_path):
    """The images sharded and scored by the evaluation's loop, and the raw files by
    predict (other batch size, other order of batches): same answer, same p(fake)."""
    from modeling.image_processing import ImageProcessor
    from pipeline.evaluation.config import EvalConfig
    from pipeline.evaluation.data import enumerate_items
    from pipeline.evaluation.runner import Scorer, load_model, score_items
    from sharding.eval_sets.cli import main as shard_benchmark

    assert shard_benchmark(["chameleon", str(folder), str(tmp_path / "bench"), "--workers", "1",
                            "--no-progress"]) == 0
    ecfg = EvalConfig(checkpoint=tiny_checkpoint, out=str(tmp_path / "e"), benchmarks={"b": str(tmp_path / "bench")},
                      batch_size=3, max_new_tokens=8, num_workers=0)
    model, tok, _ = load_model(ecfg)
    rows, failures = score_items(Scorer(model, ecfg, torch.device("cpu"), tok),
                                 enumerate_items(ecfg.sets()), ImageProcessor(model.config), ecfg, False)
    assert not failures and len(rows) == 4
    out = tmp_path / "p.jsonl"
    s = run_predict(PredictConfig(checkpoint=tiny_checkpoint, inputs=[str(folder)], out=str(out), batch_size=2,
                                  **GEN).validate())
    assert s.scored == 4 and s.failed == 0
    preds = {Path(r["path"]).name: r for r in _records(out)}
    for row in rows:
        p = preds[Path(row["relpath"]).name]
        assert p["answer"] == row["answer"] and p["parse_status"] == row["parse_status"]
        assert p["p_fake"] == pytest.approx(row["p_fake"], abs=1e-5)
        assert p["verdict"] == ("fake" if p["p_fake"] >= 0.5 else "real")
        assert set(p["sections"]) == {"summary", "caption", "reasoning", "conclusion"}


def test_bad_inputs_are_records_and_the_exit_status_says_what_happened(tiny_checkpoint, folder, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    good = _png(bad / "good.png", (20, 20), (1, 2, 3))
    data = (folder / "0_real" / "0.png").read_bytes()
    (bad / "truncated.png").write_bytes(data[: len(data) // 2])
    (bad / "text.jpg").write_bytes(b"this is not an image")
    (bad / "empty.png").write_bytes(b"")
    _png(bad / "big.png", (200, 100), (9, 9, 9))
    Image.new("L", (5000, 1)).save(bad / "sliver.png")  # 50 bytes declaring 5000 x 1: refused undecoded
    (tmp_path / "nothing").mkdir()
    out = tmp_path / "p.jsonl"
    code = cli.main(["--checkpoint", tiny_checkpoint, str(bad), str(tmp_path / "gone.webp"), str(tmp_path / "nothing"),
                     "--out", str(out), "--max-pixels", "15000", "--max-new-tokens", "4", "--num-workers", "1",
                     "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0
    recs = {Path(r["path"]).name: r for r in _records(out)}
    assert recs["good.png"]["status"] == "ok" and recs["good.png"]["path"] == good
    reasons = {n: r["reason"].split(":")[0] for n, r in recs.items() if r["status"] == "error"}
    assert reasons == {"truncated.png": "truncated", "text.jpg": "not_an_image", "empty.png": "zero_byte",
                       "big.png": "too_many_pixels", "sliver.png": "image_size", "gone.webp": "missing",
                       "nothing": "empty_folder"}
    for name in reasons:
        assert name in err  # each named on stderr
    assert "scored 1, failed 7" in err
    # Nothing scoreable: exit 1; a bad value: exit 2 naming the field.
    assert cli.main(["--checkpoint", tiny_checkpoint, str(bad / "text.jpg"), "--no-progress"]) == 1
    assert cli.main(["--checkpoint", tiny_checkpoint, good, "--threshold", "1.5"]) == 2
    assert "threshold" in capsys.readouterr().err
    assert cli.main(["--checkpoint", str(tmp_path / "no-model"), good]) == 2


def test_rerun_resumes_and_a_killed_run_loses_nothing(tiny_checkpoint, folder, tmp_path, monkeypatch):
    out = tmp_path / "p.jsonl"
    cfg = PredictConfig(checkpoint=tiny_checkpoint, inputs=[str(folder / "0_real")], out=str(out), **GEN)
    assert run_predict(cfg.validate()).scored == 2
    first = out.read_bytes()
    again = run_predict(cfg)
    assert (again.scored, again.already_done) == (0, 2) and out.read_bytes() == first
    # More inputs, and the run is killed before it writes the file: the journal keeps its records.
    cfg2 = PredictConfig(checkpoint=tiny_checkpoint, inputs=[str(folder)], out=str(out), **GEN)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(output, "finalize", killed)
    with pytest.raises(KeyboardInterrupt):
        run_predict(cfg2)
    assert out.read_bytes() == first and output.journal_dir(str(out)).is_dir()
    monkeypatch.undo()
    resumed = run_predict(cfg2)
    assert (resumed.scored, resumed.already_done) == (0, 4)
    recs = _records(out)
    assert sorted(Path(r["path"]).name for r in recs) == ["0.png", "1.png", "2.png", "3.png"]
    # Other settings are other predictions.
    other = run_predict(PredictConfig(checkpoint=tiny_checkpoint, inputs=[str(folder / "0_real")], out=str(out),
                                      threshold=0.3, **GEN))
    assert other.scored == 2 and len(_records(out)) == 6


def test_batch_size_does_not_change_results(tiny_checkpoint, folder, tmp_path):
    a = run_predict(PredictConfig(checkpoint=tiny_checkpoint, inputs=[str(folder)], out=str(tmp_path / "a.jsonl"),
                                  batch_size=1, **GEN))
    b = run_predict(PredictConfig(checkpoint=tiny_checkpoint, inputs=[str(folder)], out=str(tmp_path / "b.jsonl"),
                                  batch_size=4, **{**GEN, "num_workers": 2}))
    ra, rb = _records(tmp_path / "a.jsonl"), _records(tmp_path / "b.jsonl")
    assert a.scored == b.scored == 4 and [r["path"] for r in ra] == [r["path"] for r in rb]
    for x, y in zip(ra, rb):
        assert x["answer"] == y["answer"] and x["p_fake"] == pytest.approx(y["p_fake"], abs=1e-5)


def test_detect_only_is_the_forced_prefix_forward(tiny_checkpoint, tiny_model, folder, tmp_path):
    from modeling.image_processing import ImageProcessor
    from modeling.template import build_prompt
    from sharding.schema import EVAL_QUESTION

    out = tmp_path / "d.jsonl"
    run_predict(PredictConfig(checkpoint=tiny_checkpoint, inputs=[str(folder / "1_fake" / "1.png")], out=str(out),
                              detect_only=True, num_workers=0, progress=False))
    rec = _records(out)[0]
    assert rec["mode"] == "detect_only" and rec["answer"] is None and rec["parse_status"] == "not_generated"
    model, tok = tiny_model
    px = ImageProcessor(model.config)(Image.open(folder / "1_fake" / "1.png"))[None]
    prompt = build_prompt(tok, EVAL_QUESTION, conversation="vicuna_v1")[0]
    expected = model.score_p_fake(px, [list(prompt)], None)[0].item()
    assert rec["p_fake"] == pytest.approx(expected, abs=1e-6)


def test_video_gets_frame_scores_and_their_mean(tiny_checkpoint, tmp_path):
    import av

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 32, 24, "yuv420p"
        for i in range(10):  # 2.5 s at 4 fps -> frames at 0, 1, 2 s with --video-fps 1
            frame = av.VideoFrame.from_ndarray(np.full((24, 32, 3), i * 20, dtype=np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    out = tmp_path / "v.jsonl"
    summary = run_predict(PredictConfig(checkpoint=tiny_checkpoint, inputs=[str(path)], out=str(out), **GEN))
    rec = _records(out)[0]
    assert summary.scored == 1 and rec["kind"] == "video" and rec["n_frames"] == len(rec["frames"]) == 3
    assert [f["frame"] for f in rec["frames"]] == [0, 4, 8]
    assert rec["p_fake"] == pytest.approx(np.mean([f["p_fake"] for f in rec["frames"]]))


def test_evidence_map_is_the_fusions_input_for_that_image(tiny_checkpoint, tiny_model, folder, tmp_path):
    from modeling.image_processing import ImageProcessor
    from pipeline.inference.evidence import evidence_grid

    img = folder / "0_real" / "3.png"  # 64 x 20: wide, padded above and below
    out = tmp_path / "e.jsonl"
    run_predict(PredictConfig(checkpoint=tiny_checkpoint, inputs=[str(img)], out=str(out),
                              evidence=str(tmp_path / "ev"), evidence_top=3, **GEN))
    ev = _records(out)[0]["evidence"]
    grid = np.load(ev["npy"])
    assert grid.sum() == pytest.approx(1.0, abs=1e-5) and len(ev["top_regions"]) == 3
    assert Image.open(ev["png"]).size == (384, 384)
    model, _ = tiny_model
    with torch.no_grad():
        _, attn = model.dino_tower(ImageProcessor(model.config)(Image.open(img))[None])
    assert np.allclose(grid, evidence_grid(attn[0]), atol=1e-6)


def test_paths_on_stdin_and_text_output(tiny_checkpoint, folder, monkeypatch, capsys):
    paths = "\n".join(str(p) for p in sorted(folder.rglob("*.png"))[:2]) + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(paths))
    assert cli.main(["--checkpoint", tiny_checkpoint, "-", "--format", "text", "--max-new-tokens", "4",
                     "--num-workers", "0", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert text.count("p(fake)=") == 2 and "parse:" in text
    assert not any(n.startswith("fakereasoning-predict-stdin-") for n in os.listdir("/tmp"))


def test_a_second_run_into_the_same_file_stops_naming_the_first(tiny_checkpoint, folder, tmp_path, capsys):
    from sharding.dir_lock import acquire

    out = tmp_path / "p.jsonl"
    held = acquire(f"{out}.lock", "prediction")  # a live run in this process holds it
    try:
        code = cli.main(["--checkpoint", tiny_checkpoint, str(folder), "--out", str(out), "--no-progress"])
    finally:
        held.release()
    assert code == 2 and "is in use by" in capsys.readouterr().err and not out.exists()
    assert run_predict(PredictConfig(checkpoint=tiny_checkpoint, inputs=[str(folder / "0_real")], out=str(out),
                                     **GEN)).scored == 2
    assert not Path(f"{out}.lock").exists()
