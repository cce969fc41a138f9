"""Robustness sweeps: spec parsing and its errors, what each perturbation does to a
decoded image, the loader's variants, and the sweep's tables and plot."""
import json

import pytest
import torch
from PIL import Image, ImageChops, ImageStat

from pipeline.evaluation.config import EvalConfig, EvalConfigError
from pipeline.evaluation.perturbations import (
    CLEAN, Perturbation, PerturbationError, parse_perturbation, parse_perturbations,
)


def _pattern(w=48, h=36) -> Image.Image:
    """A busy RGB picture: a checkerboard with a colour ramp (JPEG and blur visibly change it)."""
    im = Image.new("RGB", (w, h))
    im.putdata([((x * 5) % 256, 255 * ((x // 3 + y // 3) % 2), (y * 7) % 256) for y in range(h) for x in range(w)])
    return im


def _diff(a: Image.Image, b: Image.Image) -> float:
    return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean)


def test_specs_expand_in_order_and_name_themselves():
    ps = parse_perturbations(["jpeg:95,75,50", "resize:0.5", "blur:1.0"])
    assert [p.name for p in ps] == ["jpeg:95", "jpeg:75", "jpeg:50", "resize:0.5", "blur:1"]
    assert ps[0] == Perturbation("jpeg", 95.0)


@pytest.mark.parametrize("spec, message", [
    ("jpeg:0", "integer in 1..100"), ("jpeg:75.5", "integer in 1..100"), ("resize:1.5", r"\(0, 1\]"),
    ("resize:0", r"\(0, 1\]"), ("blur:0", "> 0"), ("blur:x", "'x' is not a number"), ("sharpen:2", "KIND one of"),
    ("jpeg", "KIND one of"), ("jpeg:", "KIND one of"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(PerturbationError, match=message):
        parse_perturbation(spec)


def test_bad_specs_name_the_flag_and_the_field(tmp_path, capsys):
    with pytest.raises(PerturbationError, match="given twice"):
        parse_perturbations(["jpeg:75", "jpeg:50,75"])
    with pytest.raises(EvalConfigError, match=r"^perturb: 'blur:-1'"):
        EvalConfig(checkpoint=str(tmp_path), out="o", shards=str(tmp_path), perturb=["blur:-1"]).validate()
    from pipeline.evaluation.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--checkpoint", "c", "--out", "o", "--perturb", "jpeg:101"])
    assert "argument --perturb: 'jpeg:101': JPEG quality must be an integer in 1..100" in capsys.readouterr().err


def test_jpeg_is_deterministic_and_stronger_at_lower_quality():
    im = _pattern()
    q95, q50, q10 = (parse_perturbation(f"jpeg:{q}")[0].apply(im) for q in (95, 50, 10))
    again = parse_perturbation("jpeg:50")[0].apply(im)
    assert q50.tobytes() == again.tobytes() and q50.size == im.size and q50.mode == "RGB"
    assert 0 < _diff(im, q95) < _diff(im, q50) < _diff(im, q10)


def test_resize_is_down_only_with_half_up_rounding_and_blur_smooths():
    im = _pattern(33, 21)
    small = Perturbation("resize", 0.5).apply(im)
    assert small.size == (17, 11)  # 16.5 -> 17, 10.5 -> 11
    assert Perturbation("resize", 0.01).apply(im).size == (1, 1)  # never 0 px
    assert small.tobytes() == im.resize((17, 11), Image.Resampling.BICUBIC).tobytes()
    blurred = Perturbation("blur", 2.0).apply(im)
    assert blurred.size == im.size
    # The checkerboard's green channel loses contrast.
    assert ImageStat.Stat(blurred).stddev[1] < 0.8 * ImageStat.Stat(im).stddev[1]


def test_loader_yields_clean_and_every_variant_of_one_decode(tmp_path, eval_shard):
    from modeling.config import ModelConfig
    from modeling.image_processing import ImageProcessor
    from pipeline.evaluation.data import enumerate_items, make_eval_loader

    images = [_pattern(40 + i, 30) for i in range(3)]
    d = eval_shard(tmp_path / "s", [(f"{i}.png", im, i % 2, "g") for i, im in enumerate(images)])
    proc = ImageProcessor(ModelConfig.preset("tiny"))
    sweep = parse_perturbations(["jpeg:50", "resize:0.5", "blur:1.5"])
    items = enumerate_items({"s": d})
    plain = list(make_eval_loader(items, proc, 2, 0))
    swept = list(make_eval_loader(items, proc, 2, 0, sweep))
    assert [len(b["perturbed_pixel_values"]) for b in plain] == [0, 0]
    for a, b in zip(plain, swept):
        assert torch.equal(a["pixel_values"], b["pixel_values"])  # the clean row is unchanged
        assert len(b["perturbed_pixel_values"]) == 3
    for i, im in enumerate(images):
        batch, row = swept[i // 2], i % 2
        for j, p in enumerate(sweep):
            assert torch.equal(batch["perturbed_pixel_values"][j][row], proc(p.apply(im)))
        assert not torch.equal(batch["perturbed_pixel_values"][0][row], batch["pixel_values"][row])


def _rows(perturbation=None, shift=0.0):
    rows = []
    for i in range(8):
        label = i % 2
        p = min(max((0.8 if label else 0.2) + (shift if label else -shift) + 0.01 * i, 0.0), 1.0)
        row = {"key": f"k{i}", "set": "bench", "generator": "g", "label": label, "pred": int(p >= 0.5),
               "parse_status": "ok", "p_fake": p, "reasoning": "", "reference": ""}
        if perturbation:
            row["perturbation"] = perturbation
        rows.append(row)
    return rows


def test_report_tables_and_plot_of_a_sweep(tmp_path):
    from pipeline.evaluation.report import PERTURBED_FILE, read_predictions, rebuild, write_report

    # jpeg:50 pushes every p across 0.5 (all wrong), jpeg:90 leaves it, resize:0.5 halves the margin.
    perturbed = _rows("jpeg:90") + _rows("jpeg:50", shift=-0.7) + _rows("resize:0.5", shift=-0.15)
    ckpt = {"path": "/x", "sha256": "0" * 64, "files": {}}
    out = tmp_path / "r"
    res = write_report(str(out), _rows(), {"bench": 8}, [], ckpt, {"perturb": ["jpeg:90,50", "resize:0.5"]},
                       perturbed=perturbed)
    jpeg = res["robustness"]["bench"]["jpeg"]
    assert [r["perturbation"] for r in jpeg] == [CLEAN, "jpeg:90", "jpeg:50"]  # the clean run is row 0
    assert [r["acc"] for r in jpeg] == [1.0, 1.0, 0.0] and [r["auc"] for r in jpeg] == [1.0, 1.0, 0.0]
    assert [r["strength"] for r in res["robustness"]["bench"]["resize"]] == [None, 0.5]
    md = (out / "results.md").read_text()
    assert "**bench: jpeg** (JPEG quality)" in md and "**bench: resize** (scale factor)" in md
    assert "| clean | 8 | 100.00 | 100.00 | 100.00 | 1.0000 |" in md and "| jpeg:50 | 8 | 0.00 |" in md
    assert (out / "robustness_bench.png").read_bytes()[:4] == b"\x89PNG"
    # predictions.jsonl stays the clean run; the sweep's rows are in their own file.
    assert len(read_predictions(str(out / "predictions.jsonl"))) == 8
    lines = read_predictions(str(out / PERTURBED_FILE))
    assert len(lines) == 24 and {r["perturbation"] for r in lines} == {"jpeg:90", "jpeg:50", "resize:0.5"}
    assert rebuild(str(out))["robustness"] == json.loads(json.dumps(res["robustness"]))
