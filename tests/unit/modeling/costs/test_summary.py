"""`python -m modeling.costs.summary`: meta-device build of the paper preset, plausible counts."""
import json
import subprocess
import sys

from modeling.config import ModelConfig
from modeling.costs.summary import build_meta, main


def test_paper_summary_counts(capsys):
    assert main(["--preset", "paper"]) == 0
    data = json.loads(capsys.readouterr().out)
    c = data["components"]
    assert data["num_image_tokens"] == 576
    assert 12.9e9 < c["llm"]["total"] < 13.1e9 and c["llm"]["trainable"] == 0
    for tower in ("clip_tower", "dino_tower"):
        assert 2.9e8 < c[tower]["total"] < 3.2e8 and c[tower]["trainable"] == 0
    # LoRA r=128 on q,k,v,o,gate,up,down of 40 layers (hidden 5120, MLP 13824)
    per_layer = 128 * (4 * (5120 + 5120) + 2 * (5120 + 13824) + (13824 + 5120))
    assert c["lora"]["trainable"] == 40 * per_layer
    # mlp2x_gelu 1024 -> 5120 -> 5120
    assert c["clip_projector"]["trainable"] == 1024 * 5120 + 5120 + 5120 * 5120 + 5120
    assert c["fusion"]["frozen"] == 0 and 3.0e8 < c["fusion"]["trainable"] < 3.3e8
    total = c["total"]
    assert total["total"] == total["trainable"] + total["frozen"]
    assert total["total"] == sum(v["total"] for k, v in c.items() if k != "total")
    assert total["total_bf16_bytes"] == 2 * total["total"]


def test_tiny_summary_full_finetune(capsys):
    assert main(["--preset", "tiny", "--vocab-size", "500", "--no-lora"]) == 0
    c = json.loads(capsys.readouterr().out)["components"]
    assert c["lora"]["total"] == 0 and c["llm"]["trainable"] == c["llm"]["total"] > 0


def test_meta_build_holds_no_weights():
    cfg = ModelConfig.preset("paper")
    model = build_meta(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers() if b.numel() > 1)


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "modeling.costs.summary", "--help"],
                         capture_output=True, text=True, check=True)
    assert "--preset" in out.stdout and "meta device" in out.stdout
