"""The scoring loop in one process with the tiny model: batching does not change
answers, every image gets a row or a failure, rows carry what the report needs."""
import pytest
import torch

from pipeline.evaluation.config import EvalConfig, EvalConfigError
from pipeline.evaluation.parsing import ALL_STATUSES
from pipeline.evaluation.report import PREDICTION_FIELDS
from pipeline.evaluation.runner import Scorer, add_text_scores, load_model, score_items


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pipeline.evaluation.tiny import build_tiny_model

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("m")
    return build_tiny_model(str(d / "model"))


def _cfg(model, tmp_path, **kw):
    (tmp_path / "shards").mkdir(exist_ok=True)
    return EvalConfig(checkpoint=model, out=str(tmp_path / "out"), shards=str(tmp_path / "shards"),
                      max_new_tokens=6, num_workers=0, **kw)


def test_batched_generation_matches_batch_of_one(tiny, tmp_path):
    model, tok, fmt = load_model(_cfg(tiny, tmp_path))
    assert fmt == "fakereasoning"
    scorer = Scorer(model, _cfg(tiny, tmp_path), torch.device("cpu"))
    torch.manual_seed(1)
    px = torch.randn(3, 3, model.config.image_size, model.config.image_size)
    samples = [{"key": f"k{i}", "set": "s", "generator": "flux", "label": i % 2, "reference": "the edges",
                "relpath": f"{i}.png", "shard": "x.tar", "index": i} for i in range(3)]
    batched = scorer.score_batch(px, samples)
    single = [scorer.score_batch(px[i:i + 1], samples[i:i + 1])[0] for i in range(3)]
    for a, b in zip(batched, single):
        assert a["answer"] == b["answer"] and a["parse_status"] == b["parse_status"]
        assert a["p_fake"] == pytest.approx(b["p_fake"], abs=1e-5) and 0.0 <= a["p_fake"] <= 1.0
        assert set(PREDICTION_FIELDS) <= set(a) and a["parse_status"] in ALL_STATUSES
    add_text_scores(batched, None)
    assert all(r["bleu1"] is not None and r["css"] is None for r in batched)


def test_score_items_counts_failures(tiny, tmp_path):
    import io
    import json

    from PIL import Image

    from pipeline.evaluation.data import enumerate_items
    from sharding.tar_writer import TarWriter

    d = tmp_path / "set"
    d.mkdir()
    w = TarWriter(str(d / "shard-000000.tar"))
    for i, ok in enumerate([True, False, True]):
        buf = io.BytesIO()
        Image.new("RGB", (9, 7), (i, 0, 0)).save(buf, "PNG")
        w.add(f"k{i}.png", buf.getvalue() if ok else b"not an image")
        w.add(f"k{i}.json", json.dumps({"label": i % 2, "generator": "g", "reference": "", "relpath": f"{i}.png",
                                        "image_ext": "png"}).encode())
    w.commit()
    (d / "sizes.json").write_text('{"shard-000000.tar": 3}')
    cfg = _cfg(tiny, tmp_path, batch_size=2)
    model, _, _ = load_model(cfg)
    from modeling.image_processing import ImageProcessor

    rows, failures = score_items(Scorer(model, cfg, torch.device("cpu")), enumerate_items({"b": str(d)}),
                                 ImageProcessor(model.config), cfg, show_progress=False)
    assert sorted(r["key"] for r in rows) == ["k0", "k2"]
    assert [(f["key"], f["set"]) for f in failures] == [("k1", "b")] and "UnidentifiedImageError" in failures[0]["reason"]


def test_config_errors_name_the_field(tiny, tmp_path):
    with pytest.raises(EvalConfigError, match="batch_size"):
        _cfg(tiny, tmp_path, batch_size=0).validate()
    with pytest.raises(EvalConfigError, match="checkpoint"):
        EvalConfig(checkpoint=str(tmp_path / "nope"), out="o", shards=str(tmp_path)).validate()
    with pytest.raises(EvalConfigError, match="give at least one set"):
        EvalConfig(checkpoint=tiny, out="o").validate()
    with pytest.raises(EvalConfigError, match="used twice"):
        EvalConfig(checkpoint=tiny, out="o", shards=str(tmp_path), benchmarks={"mmfr": str(tmp_path)}).sets()
