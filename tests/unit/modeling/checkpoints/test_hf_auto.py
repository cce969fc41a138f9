"""transformers' AutoConfig/AutoModel on a merged export, registered by `import modeling`."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

import modeling  # noqa: F401  (the import under test: it registers the Auto classes)
from modeling.checkpoints.checkpoint import CheckpointError, export_merged, load_pretrained
from modeling.config import ModelConfig
from modeling.checkpoints.hf_auto import FakeReasoningAutoModel, FakeReasoningConfig
from modeling.model import FakeReasoningModel
from modeling.template import build_training_example
from modeling.tokenization.tokenizer import build_bpe_tokenizer, demo_corpus
from sharding import schema

ANSWER = "<REASONING>x</REASONING>\n<CONCLUSION>This image is fake.</CONCLUSION>"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny model with every weight perturbed, exported; and a batch with its CPM label."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("auto")
    tok = build_bpe_tokenizer(demo_corpus(schema.ATTRIBUTES, [schema.EVAL_QUESTION]), root / "tok", vocab_size=600)
    torch.manual_seed(0)
    model = FakeReasoningModel(ModelConfig.preset("tiny"), tok)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    export_merged(model.eval(), tok, root / "merged")
    ex = build_training_example(tok, schema.EVAL_QUESTION, ANSWER)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(1, 3, 56, 56, generator=g), torch.tensor([ex.input_ids]),
             torch.ones(1, len(ex.input_ids), dtype=torch.long), torch.tensor([ex.labels]), torch.tensor([1]))
    return {"dir": root / "merged", "batch": batch, "source": model}


def outputs(model, batch):
    with torch.no_grad():
        out = model(*batch, return_logits=True)
    return out.logits, out.p_fake


def test_auto_config_reads_the_export(export):
    config = AutoConfig.from_pretrained(export["dir"])
    saved = json.loads((export["dir"] / "config.json").read_text())
    assert type(config) is FakeReasoningConfig and config.model_type == "fakereasoning"
    assert config.model == saved["model"] and config.format_version == saved["format_version"]
    assert config.model_config().to_dict() == ModelConfig.from_dict(saved["model"]).to_dict()


def test_auto_model_gives_the_outputs_of_load_pretrained(export):
    model = AutoModel.from_pretrained(export["dir"])
    reference, _ = load_pretrained(export["dir"])
    assert isinstance(model, FakeReasoningModel) and not model.training
    logits, p_fake = outputs(model, export["batch"])
    want_logits, want_p = outputs(reference, export["batch"])
    assert torch.equal(logits, want_logits) and torch.equal(p_fake, want_p)
    assert torch.isfinite(p_fake).all()  # the CPM position was found: p_fake is a real score
    # And they are the exported model's: only the LoRA merge's rounding differs.
    src_logits, src_p = outputs(export["source"], export["batch"])
    assert torch.allclose(logits, src_logits, atol=1e-5, rtol=0) and torch.allclose(p_fake, src_p, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(export["dir"])
    assert tokenizer.encode(ANSWER) == model.tokenizer.encode(ANSWER)


def test_auto_model_honours_dtype_and_an_edited_config(export):
    model = AutoModel.from_pretrained(export["dir"], dtype=torch.bfloat16)
    assert model.config.dtype == "bfloat16" and next(model.llm.parameters()).dtype == torch.bfloat16
    config = AutoConfig.from_pretrained(export["dir"])
    config.model["cpm"]["temperature"] = 2.5
    edited = AutoModel.from_pretrained(export["dir"], config=config, attn_implementation="eager")
    assert edited.config.cpm.temperature == 2.5 and edited.config.llm.attn_implementation == "eager"
    _, p_fake = outputs(edited, export["batch"])
    _, default_p = outputs(AutoModel.from_pretrained(export["dir"]), export["batch"])
    assert not torch.equal(p_fake, default_p)  # the temperature reached the CPM


def test_auto_model_refuses_what_it_cannot_honour(export, tmp_path):
    with pytest.raises(ValueError, match=r"does not support \['device_map'\]"):
        AutoModel.from_pretrained(export["dir"], device_map="auto")
    # (AutoModel itself first looks a missing folder up on the hub, and fails there.)
    with pytest.raises(CheckpointError, match="absent: not a local folder"):
        FakeReasoningAutoModel.from_pretrained(str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="no positional model arguments"):
        FakeReasoningAutoModel.from_pretrained(export["dir"], object())
