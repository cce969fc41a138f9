import json
import random

import pytest
from sklearn.metrics import roc_auc_score

from pipeline.evaluation.metrics import bleu1, rouge_l, text_scores
from pipeline.evaluation.parsing import parse_answer
from pipeline.evaluation.report import (
    PREDICTION_FIELDS, REFERENCE_COLUMNS, STRICT_COLUMNS, checkpoint_identity, read_predictions, rebuild, write_report,
)
from pipeline.evaluation.table_format import format_value

ANSWERS = [
    "<REASONING>The edges are smooth and natural.</REASONING><CONCLUSION>This image is real.</CONCLUSION>",
    "<REASONING>Irregular edges and anomalous texture.</REASONING><CONCLUSION>This image is fake.</CONCLUSION>",
    "<REASONING>Lighting is odd</REASONING><CONCLUSION>maybe fake, maybe real</CONCLUSION>",
    "<REASONING>Texture is consistent and the",
    "<REASONING>Low image quality.</REASONING><CONCLUSION>It is fake</CONCLUSION>",
]
REFS = ["The edges are smooth and natural.", "Anomalous image texture with irregular edges.", "Low image quality."]


def make_predictions(seed=0):
    rng = random.Random(seed)
    preds = []
    for set_name, gens, with_ref in (("mmfr", ["flux", "stablediffusion", "gigagan"], True),
                                     ("genimage", ["adm", "biggan"], False)):
        for g in gens:
            for i in range(12):
                label = i % 2
                answer = rng.choice(ANSWERS)
                parsed = parse_answer(answer)
                ref = rng.choice(REFS) if with_ref else ""
                row = {"key": f"{g}-{i:03d}", "set": set_name, "generator": g, "label": label,
                       "pred": parsed.pred, "parse_status": parsed.parse_status,
                       "p_fake": rng.random() * 0.5 + 0.4 * label, "reasoning": parsed.reasoning,
                       "reference": ref, "answer": answer}
                row.update(text_scores([ref], [parsed.reasoning])[0])
                row["css"] = None if not ref else rng.random()
                preds.append(row)
    rng.shuffle(preds)  # the report must not depend on the order rows arrive in (ranks)
    return preds


@pytest.fixture
def checkpoint(tmp_path):
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"weights")
    (d / "sub" / "adapter.bin").write_bytes(b"lora")
    (d / "config.json").write_text("{}")
    return checkpoint_identity(str(d))


def _md_tables(text):
    """{(set, convention): {row name: [cells]}} parsed from results.md."""
    tables, set_name, conv = {}, None, None
    for line in text.splitlines():
        if line.startswith("## "):
            set_name = line[3:].strip()
        elif line.startswith("**") and line.endswith("**"):
            # "Reference convention" -> "reference"; other tables by their whole title.
            title = line.strip("*")
            conv = title.split()[0].lower() if title.endswith("convention") else title
            tables[(set_name, conv)] = {}
        elif line.startswith("| ") and not line.startswith("| Generator"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            tables[(set_name, conv)][cells[0]] = cells[1:]
    return tables


def _recompute(rows):
    """Independent recomputation of the table numbers of one generator from its jsonl lines."""
    parsed = [r for r in rows if r["pred"] is not None]
    def acc(group, label=None):
        g = [r for r in group if label is None or r["label"] == label]
        return sum(r["pred"] == r["label"] for r in g) / len(g) if g else None
    def text(group, fn):
        g = [r for r in group if r["reference"]]
        return sum(fn(r["reference"], r["reasoning"]) for r in g) / len(g) if g else None
    def css(group):
        g = [r for r in group if r["reference"]]
        return sum(r["css"] for r in g) / len(g) if g else None
    labels = [r["label"] for r in rows]
    auc = roc_auc_score(labels, [r["p_fake"] for r in rows]) if len(set(labels)) == 2 else None
    return {
        "n": len(rows), "real_acc": acc(parsed, 0), "fake_acc": acc(parsed, 1), "acc": acc(parsed),
        "real_acc_strict": acc(rows, 0), "fake_acc_strict": acc(rows, 1), "acc_strict": acc(rows),
        "bleu1": text(parsed, bleu1), "rouge_l": text(parsed, rouge_l), "css": css(parsed),
        "bleu1_strict": text(rows, bleu1), "rouge_l_strict": text(rows, rouge_l), "css_strict": css(rows),
        "parse_failure_rate": (len(rows) - len(parsed)) / len(rows), "auc": auc,
        "cpm_acc": sum((r["p_fake"] >= 0.5) == (r["label"] == 1) for r in rows) / len(rows),
    }


def test_report_tables_match_predictions(tmp_path, checkpoint):
    preds = make_predictions()
    expected = {"mmfr": 36 + 2, "genimage": 24}
    failures = [{"key": "bad1", "set": "mmfr", "generator": "flux", "reason": "cannot decode image"},
                {"key": "bad2", "set": "mmfr", "generator": "if", "reason": "truncated tar member"}]
    out = tmp_path / "results"
    write_report(str(out), preds, expected, failures, checkpoint, {"batch_size": 4})
    for name in ("results.json", "results.md", "predictions.jsonl", "accuracy_mmfr.png", "roc_mmfr.png",
                 "accuracy_genimage.png", "roc_genimage.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "roc_mmfr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((out / "results.json").read_text())
    c = results["counts"]
    assert (c["expected"], c["scored"], c["failed"]) == (62, 60, 2)
    assert c["per_set"]["mmfr"] == {"expected": 38, "scored": 36, "failed": 2}
    assert results["checkpoint"]["sha256"] == checkpoint["sha256"] and results["config"]["batch_size"] == 4

    lines = read_predictions(str(out / "predictions.jsonl"))
    assert len(lines) == 60 and all(set(PREDICTION_FIELDS) <= set(r) for r in lines)
    assert [r["generator"] for r in lines if r["set"] == "mmfr"][:12] == ["stablediffusion"] * 12

    tables = _md_tables((out / "results.md").read_text())
    for set_name, gens in (("mmfr", ["stablediffusion", "flux", "gigagan"]), ("genimage", ["adm", "biggan"])):
        recomputed = {g: _recompute([r for r in lines if r["set"] == set_name and r["generator"] == g]) for g in gens}
        for conv, columns in (("reference", REFERENCE_COLUMNS), ("strict", STRICT_COLUMNS)):
            table = tables[(set_name, conv)]
            assert list(table) == gens + ["**Average**", "**All images**"]  # paper row order + average row
            pooled = _recompute([r for r in lines if r["set"] == set_name])
            for (key, _, kind), cell in zip(columns, table["**All images**"]):
                if key in pooled:
                    assert cell == format_value(pooled[key], kind), (set_name, "pooled", key)
            for g in gens:
                for (key, _, kind), cell in zip(columns, table[g]):
                    if key in recomputed[g]:
                        assert cell == format_value(recomputed[g][key], kind), (set_name, g, key)
            for (key, _, kind), cell in zip(columns, table["**Average**"]):
                if key == "n":
                    assert cell == str(sum(recomputed[g]["n"] for g in gens))
                elif key in recomputed[gens[0]]:
                    vals = [recomputed[g][key] for g in gens if recomputed[g][key] is not None]
                    assert cell == format_value(sum(vals) / len(vals) if vals else None, kind), (set_name, key)
    # detection-only set: text metrics are n/a, not 0
    assert tables[("genimage", "reference")]["adm"][4] == "n/a"


def test_rebuild_from_predictions_is_identical(tmp_path, checkpoint):
    out = tmp_path / "r"
    first = write_report(str(out), make_predictions(1), {"mmfr": 36, "genimage": 24}, [], checkpoint, {}, plots=False)
    md = (out / "results.md").read_text()
    second = rebuild(str(out), plots=False)
    assert second["sets"] == first["sets"] and (out / "results.md").read_text() == md


def test_counts_that_do_not_add_up_are_an_error(tmp_path, checkpoint):
    preds = make_predictions()
    with pytest.raises(RuntimeError, match="expected"):
        write_report(str(tmp_path), preds, {"mmfr": 36, "genimage": 25}, [], checkpoint, {}, plots=False)
    with pytest.raises(RuntimeError, match="more than once"):
        write_report(str(tmp_path), preds + preds[:1], {"mmfr": 37, "genimage": 24} if preds[0]["set"] == "mmfr"
                     else {"mmfr": 36, "genimage": 25}, [], checkpoint, {}, plots=False)


def test_checkpoint_identity(tmp_path, checkpoint):
    assert set(checkpoint["files"]) == {"model.safetensors", "sub/adapter.bin"}
    other = tmp_path / "copy"
    other.mkdir()
    (other / "sub").mkdir()
    (other / "model.safetensors").write_bytes(b"weights")
    (other / "sub" / "adapter.bin").write_bytes(b"lora")
    assert checkpoint_identity(str(other))["sha256"] == checkpoint["sha256"]
    (other / "model.safetensors").write_bytes(b"weightz")
    assert checkpoint_identity(str(other))["sha256"] != checkpoint["sha256"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weight file"):
        checkpoint_identity(str(tmp_path / "empty"))


@pytest.mark.parametrize("protocol", ["ours", "reference"])
def test_protocol_and_parse_statuses_are_recorded(tmp_path, checkpoint, protocol):
    from pipeline.evaluation.config import EvalConfig
    from pipeline.evaluation.parsing import PARSERS

    cfg = EvalConfig(protocol=protocol, max_per_class=10, max_new_tokens=8)
    preds = make_predictions(2)
    for p in preds:  # parse with the protocol's own parser, as the runner does
        parsed = PARSERS[protocol](p["answer"])
        p.update(pred=parsed.pred, parse_status=parsed.parse_status, reasoning=parsed.reasoning)
    selection = {"mmfr": {"available": 50, "selected": 36, "not_in_reasoning_json": 4, "over_max_per_class": 10,
                          "over_limit": 0}}
    out = tmp_path / protocol
    write_report(str(out), preds, {"mmfr": 36, "genimage": 24}, [], checkpoint, cfg.to_dict(), plots=False,
                 extra={"protocol": cfg.protocol_record(), "selection": selection})
    results = json.loads((out / "results.json").read_text())
    rec = results["protocol"]
    assert rec["name"] == protocol and results["config"]["protocol"] == protocol
    want = {"ours": ("vicuna_v1", 0.0), "reference": ("llava_v1", 0.2)}[protocol]
    assert (rec["generation"]["conversation"], rec["generation"]["temperature"]) == want
    assert rec["generation"]["top_p"] is None and rec["generation"]["num_beams"] == 1
    assert rec["deviations"] == {"max_new_tokens": 8} and rec["max_per_class"] == 10
    assert rec["css_empty_hypothesis"] == ("clip_embedding" if protocol == "reference" else "zero")
    statuses = results["parse_status"]["mmfr"]
    assert sum(statuses.values()) == 36
    assert statuses == {s: sum(p["parse_status"] == s for p in preds if p["set"] == "mmfr") for s in statuses}
    # ANSWERS[3] has no </REASONING>: the reference drops it, ours reads it as having no conclusion.
    assert ("no_reasoning" in statuses) == (protocol == "reference")
    md = (out / "results.md").read_text()
    assert f"Protocol: **{protocol} (" in md and f"`{want[0]}`" in md and "max_new_tokens=8" in md
    assert "Selected 36 of 50 images (not in the reasoning JSON: 4, over max per class: 10" in md
    unparsed = ", ".join(f"{k} {v}" for k, v in statuses.items() if k not in ("ok", "loose"))
    assert f"Unparseable answers (left out of the reference convention): {unparsed}." in md
    again = rebuild(str(out), plots=False)
    assert again["protocol"] == rec and again["selection"] == selection and (out / "results.md").read_text() == md


def test_a_set_where_no_answer_parses_is_warned(tmp_path, checkpoint, caplog):
    preds = make_predictions(1)
    for p in preds:
        if p["set"] == "mmfr":
            p.update(pred=None, parse_status="no_conclusion")
    with caplog.at_level("WARNING", logger="pipeline.evaluation.report"):
        write_report(str(tmp_path), preds, {"mmfr": 36, "genimage": 24}, [], checkpoint, {}, plots=False)
    warned = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("set mmfr: none of its") and "no_conclusion" in m for m in warned), warned
    assert not any(m.startswith("set genimage") for m in warned), warned
