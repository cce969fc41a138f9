"""The model card (README.md) written into both export folders, and its Evaluation section."""
from __future__ import annotations

import re

import pytest
import torch
import yaml

from modeling.checkpoints.checkpoint import export_merged, save_trainable
from modeling.config import ModelConfig
from modeling.model import FakeReasoningModel
from modeling.checkpoints.model_card import EVAL_COLUMNS, update_card_evaluation, write_model_card
from modeling.tokenization.tokenizer import build_bpe_tokenizer, demo_corpus
from pipeline.evaluation.parsing import parse_answer
from pipeline.evaluation.report import checkpoint_identity, write_report
from sharding import schema

TRAINING = {"data": {"train_shards": "mmfr/train-{000000..000003}.tar", "batch_size": 2},
            "loop": {"max_steps": 40, "grad_accum": 1}, "optim": {"lr": 2e-4}}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("card")
    tok = build_bpe_tokenizer(demo_corpus(schema.ATTRIBUTES, [schema.EVAL_QUESTION]), root / "tok", vocab_size=600)
    torch.manual_seed(0)
    model = FakeReasoningModel(ModelConfig.preset("tiny"), tok).eval()
    export_merged(model, tok, root / "merged", training=TRAINING)
    save_trainable(model, root / "trainable", training="Trained by **hand** on three images.")
    return root, model


def sections(text: str) -> dict[str, str]:
    """{level-2 heading: its body} of a card."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def yaml_blocks(text: str) -> list:
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)]


def test_merged_card_says_what_it_is_how_to_load_it_and_how_it_was_trained(exports):
    root, model = exports
    text = (root / "merged" / "README.md").read_text()
    assert text.startswith("---\n")  # Hugging Face's metadata block opens the file
    front, body = text[4:].split("---\n", 1)
    assert "fakereasoning" in yaml.safe_load(front)["tags"] and "license" not in yaml.safe_load(front)
    assert body.lstrip().splitlines()[0] == "# FakeReasoning model (merged export)"
    s = sections(text)
    assert list(s) == ["Architecture", "Files", "How to load", "Training", "Evaluation"]
    assert f"LLaMA, {model.config.llm.num_layers} layers, hidden size {model.config.llm.hidden_size}" in s["Architecture"]
    assert "no LoRA (merged into the weights)" in s["Architecture"]
    listed = re.findall(r"^- `(.+)`$", s["Files"], flags=re.M)
    assert listed == sorted(p.name for p in (root / "merged").iterdir() if p.name != "README.md")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(listed)
    for line in ("import modeling", "model = AutoModel.from_pretrained(path)",
                 "tokenizer = AutoTokenizer.from_pretrained(path)", "model, tokenizer = load_pretrained(path)"):
        assert line in s["How to load"]
    data, rest = yaml_blocks(s["Training"])
    assert data == TRAINING["data"] and rest == {k: v for k, v in TRAINING.items() if k != "data"}
    assert s["Evaluation"].strip().startswith("Not evaluated yet")


def test_trainable_card_points_at_its_loader_and_the_adapter(exports):
    root, _ = exports
    s = sections((root / "trainable" / "README.md").read_text())
    assert "load_for_inference(\"path/to/this/folder\")" in s["How to load"]
    assert "peft.PeftModel.from_pretrained(llm, folder)" in s["How to load"]  # the tiny preset trains LoRA
    assert "LoRA r=8, alpha=16" in s["Architecture"] and "- LLM: stored in this folder" in s["Architecture"]
    assert s["Training"].strip() == "Trained by **hand** on three images."
    assert "`adapter_model.safetensors`" in s["Files"]


def _results_json(out_dir, checkpoint_dir, fake_answer: str) -> dict:
    """A real results.json (pipeline.evaluation.report) over 4 images of two generators."""
    rows = []
    for i, (gen, label) in enumerate([("flux", 0), ("flux", 1), ("sdxl", 0), ("sdxl", 1)]):
        answer = f"<REASONING>r</REASONING><CONCLUSION>This image is {'real' if label == 0 else fake_answer}.</CONCLUSION>"
        parsed = parse_answer(answer)
        rows.append({"key": f"{gen}-{i}", "set": "mmfr", "generator": gen, "label": label, "pred": parsed.pred,
                     "parse_status": parsed.parse_status, "p_fake": 0.2 + 0.6 * label, "reasoning": parsed.reasoning,
                     "reference": "r", "answer": answer, "bleu1": 1.0, "rouge_l": 1.0, "css": 0.9})
    return write_report(str(out_dir), rows, {"mmfr": 4}, [], checkpoint_identity(str(checkpoint_dir)), {},
                        plots=False)


def _table_row(section: str, name: str) -> list[str]:
    row = next(line for line in section.splitlines() if line.startswith(f"| {name} |"))
    return [c.strip() for c in row.strip("|").split("|")][1:]


def test_evaluation_section_is_filled_and_refreshed_from_results_json(exports, tmp_path):
    root, _ = exports
    card = root / "merged" / "README.md"
    before = sections(card.read_text())
    results = _results_json(tmp_path / "eval1", root / "merged", fake_answer="fake")
    update_card_evaluation(root / "merged", tmp_path / "eval1" / "results.json")
    s = sections(card.read_text())
    avg = results["sets"]["mmfr"]["average"]
    cells = _table_row(s["Evaluation"], "mmfr")
    assert len(cells) == len(EVAL_COLUMNS)
    assert cells[0] == str(avg["n"]) == "4" and cells[1] == f"{100 * avg['acc']:.2f}" == "100.00"
    assert cells[5] == f"{avg['auc']:.4f}"
    assert results["checkpoint"]["sha256"][:16] in s["Evaluation"]
    assert str(tmp_path / "eval1" / "results.json") in s["Evaluation"]
    assert {k: v for k, v in s.items() if k != "Evaluation"} == {k: v for k, v in before.items() if k != "Evaluation"}

    # A second run replaces the section (one Evaluation, new numbers), and a section
    # someone added after it stays.
    card.write_text(card.read_text() + "\n## Citation\n\nSee the paper.\n")
    _results_json(tmp_path / "eval2", root / "merged", fake_answer="real")
    update_card_evaluation(root / "merged", tmp_path / "eval2" / "results.json")
    text = card.read_text()
    s = sections(text)
    assert text.count("## Evaluation") == 1 and list(s)[-2:] == ["Evaluation", "Citation"]
    assert _table_row(s["Evaluation"], "mmfr")[1] == "50.00" and s["Citation"].strip() == "See the paper."


def test_sentencepiece_folders_point_at_the_exact_loader(exports, tmp_path):
    # transformers 5's AutoTokenizer re-derives a tokenizer.model with other merges;
    # the card must not promise it gives the training ids there.
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes(b"")
    s = sections(write_model_card(tmp_path, "merged", exports[1].config).read_text())
    assert "tokenizer = load_tokenizer(path)" in s["How to load"] and "AutoTokenizer" not in s["How to load"]


def test_card_errors_name_the_file(exports, tmp_path):
    root, model = exports
    (tmp_path / "bad.json").write_text('{"sets": 3}')
    with pytest.raises(ValueError, match=r"bad.json: no \"sets\" mapping"):
        update_card_evaluation(root / "merged", tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"missing.json: cannot read the evaluation results"):
        update_card_evaluation(root / "merged", tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match=r"README.md: no model card to update"):
        update_card_evaluation(tmp_path, {"sets": {}})
    with pytest.raises(ValueError, match="kind must be 'merged' or 'trainable'"):
        write_model_card(tmp_path, "reference", model.config)
