"""The model card (README.md) of an export folder: what it is, how to load it,
how it was trained, and how it scored.

`write_model_card` writes it when an export is saved (modeling.checkpoints.checkpoint
export_merged / save_trainable call it last, so the file list is complete).
The training part is whatever the caller knows: the run's configuration as a
mapping (its `data` section shown first, as the data the model was trained on)
or ready markdown. `update_card_evaluation` adds or replaces the "Evaluation"
section from an evaluation run's results.json, so the eval stage can refresh a
card after the fact; the rest of the card is left as it was.

The front matter is the Hugging Face model card metadata block (YAML between
`---` lines at the top of README.md), with tags only: no license is claimed,
since that depends on the base weights the model was trained from.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from common.atomic_files import write_atomic
from modeling.config import ModelConfig

CARD_FILE = "README.md"
EVAL_HEADING = "## Evaluation"
ExportKind = Literal["merged", "trainable"]
_TAGS = ("fakereasoning", "image-forgery-detection", "explainable-ai", "multimodal")
_NOT_EVALUATED = ("Not evaluated yet. `modeling.checkpoints.model_card.update_card_evaluation(folder, \"results.json\")` "
                  "fills this section from an evaluation run.")
# Columns of the evaluation table: results.json "average" key, header, kind
# (pct: a fraction shown in %, frac: shown as is, int: a count).
EVAL_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("n", "N", "int"),
    ("acc", "Acc", "pct"),
    ("real_acc", "Real Acc", "pct"),
    ("fake_acc", "Fake Acc", "pct"),
    ("acc_strict", "Acc (strict)", "pct"),
    ("auc", "AUC", "frac"),
    ("ap", "AP", "frac"),
    ("css", "CSS", "frac"),
)


# ---------------------------------------------------------------------- the card
def write_model_card(folder: str | Path, kind: ExportKind, model_config: ModelConfig,
                     training: Mapping | str | None = None, results: Mapping | str | Path | None = None) -> Path:
    """Write folder/README.md for an export of `kind` and return its path.

    training: the run's configuration (a mapping, e.g. TrainConfig.to_dict()) or
        markdown describing the run; None writes "not recorded".
    results: an evaluation's results.json (its path or its contents), when known.
    """
    if kind not in ("merged", "trainable"):
        raise ValueError(f"model card kind must be 'merged' or 'trainable', got {kind!r}")
    out = Path(folder)
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != CARD_FILE)
    parts = [_front_matter(), _intro(kind), _architecture(model_config, kind), _files(files),
             _how_to_load(kind, files), _training(training),
             evaluation_section(results) if results is not None else f"{EVAL_HEADING}\n\n{_NOT_EVALUATED}\n"]
    path = out / CARD_FILE
    write_atomic(path, "\n".join(parts))
    return path


def _front_matter() -> str:
    return "---\n" + yaml.safe_dump({"tags": list(_TAGS)}, sort_keys=False) + "---\n"


def _intro(kind: ExportKind) -> str:
    what = {
        "merged": "the merged export: every weight in this folder, LoRA merged into the LLM. "
                  "It is self-contained and is what evaluation and inference load.",
        "trainable": "the trainable state: the LoRA adapter and the trained non-LoRA weights (projectors, "
                     "fusion). The frozen LLM and vision towers are read from the paths in model_config.json "
                     "when they have one; path-less (randomly initialised) ones are stored in "
                     "base_weights.safetensors. Load it to continue training or to evaluate.",
    }[kind]
    return (f"# FakeReasoning model ({kind} export)\n\n"
            "A FakeReasoning forgery detection and reasoning model: a LLaVA-style multimodal LLM "
            "that answers whether an image is real or generated, with its reasoning "
            "(SUMMARY, CAPTION, REASONING, CONCLUSION), and gives p(fake) from its "
            f"CPM head at the answer's \"<CONCLUSION> This image is\". This folder is {what}\n")


def _architecture(cfg: ModelConfig, kind: ExportKind) -> str:
    llm, clip, dino = cfg.llm, cfg.clip, cfg.dino
    lora = (f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha} on {list(cfg.lora.target_modules)}"
            if cfg.lora.enabled else "no LoRA (merged into the weights)" if kind == "merged" else "no LoRA")
    lines = [
        "## Architecture", "",
        f"- LLM: LLaMA, {llm.num_layers} layers, hidden size {llm.hidden_size}, {llm.num_heads} heads, "
        f"vocabulary {llm.vocab_size}; {lora}",
        f"- CLIP tower: {clip.num_layers} layers, hidden size {clip.hidden_size}, patch {clip.patch_size}",
        f"- DINOv2 tower: {dino.num_layers} layers, hidden size {dino.hidden_size}, patch {dino.patch_size}",
        f"- Projectors: {cfg.projector_type}; forgery-aware fusion with {cfg.fusion.num_heads} heads",
        f"- Input images: {cfg.image_size} px; weights in {cfg.dtype}",
        f"- CPM: {'enabled' if cfg.cpm.enabled else 'disabled'}, temperature {cfg.cpm.temperature}",
    ]
    if kind == "trainable":
        for name, path in (("LLM", llm.path), ("CLIP tower", clip.path), ("DINOv2 tower", dino.path)):
            lines.append(f"- {name} read from: `{path}`" if path else f"- {name}: stored in this folder")
    return "\n".join(lines) + "\n"


def _files(files: list[str]) -> str:
    return "## Files\n\n" + "\n".join(f"- `{name}`" for name in files) + "\n"


def _tokenizer_lines(files: list[str]) -> list[str]:
    """How to load this folder's tokenizer. With a SentencePiece tokenizer.model,
    transformers 5's AutoTokenizer rebuilds the tokenizer from it with merges in
    another order than SentencePiece's, so some texts get other ids; modeling's
    loader is exact (modeling/tokenization/loading.py has the measurements).
    transformers 4 reads the folder's tokenizer.json, which is exact."""
    if "tokenizer.model" in files:
        return ["from modeling.tokenization.loading import load_tokenizer",
                "tokenizer = load_tokenizer(path)  # SentencePiece-exact ids (also model.tokenizer)"]
    return ["from transformers import AutoTokenizer",
            "tokenizer = AutoTokenizer.from_pretrained(path)  # any transformers >= 4.50"]


def _how_to_load(kind: ExportKind, files: list[str]) -> str:
    if kind == "merged":
        code = [
            "import modeling  # registers model_type \"fakereasoning\" with transformers' Auto classes",
            "from transformers import AutoConfig, AutoModel",
            "",
            "path = \"path/to/this/folder\"",
            "config = AutoConfig.from_pretrained(path)",
            "model = AutoModel.from_pretrained(path)  # a modeling.model.FakeReasoningModel, eval mode",
            *_tokenizer_lines(files),
            "",
            "# the same model and tokenizer without the Auto classes:",
            "from modeling.checkpoints.checkpoint import load_pretrained",
            "model, tokenizer = load_pretrained(path)",
        ]
        note = "`AutoModel.from_pretrained` needs no `trust_remote_code`: the code is the installed `modeling` package."
    else:
        code = [
            "from modeling.checkpoints.checkpoint import load_for_inference",
            "",
            "model, tokenizer = load_for_inference(\"path/to/this/folder\")  # eval mode",
        ]
        note = ("To train on from it, build the model from model_config.json and call "
                "`modeling.checkpoints.checkpoint.load_trainable(model, folder)`.")
        if "adapter_config.json" in files:
            note += (" `adapter_config.json` and `adapter_model.safetensors` are a peft LoRA adapter of the LLM: "
                     "`peft.PeftModel.from_pretrained(llm, folder)` applies it to the base LLM alone.")
    return "## How to load\n\n```python\n" + "\n".join(code) + "\n```\n\n" + note + "\n"


def _plain(data: Any) -> Any:
    """JSON-like copy of a config (paths, tuples and enums become strings/lists) for YAML."""
    return json.loads(json.dumps(data, default=str))


def _yaml_block(data: Any) -> str:
    return "```yaml\n" + yaml.safe_dump(_plain(data), sort_keys=False, allow_unicode=True) + "```\n"


def _training(training: Mapping | str | None) -> str:
    head = "## Training\n\n"
    if training is None:
        return head + "Not recorded: this export was written without the run's configuration.\n"
    if isinstance(training, str):
        return head + training.strip() + "\n"
    if not isinstance(training, Mapping):
        raise TypeError(f"model card training info must be a mapping or markdown text, got {type(training).__name__}")
    rest = {k: v for k, v in training.items() if k != "data"}
    parts = [head.rstrip("\n") + "\n"]
    if "data" in training:
        parts += ["### Data\n", _yaml_block(training["data"])]
    if rest:
        parts += ["### Configuration\n", _yaml_block(rest)]
    return "\n".join(parts)


# ---------------------------------------------------------------------- the evaluation section
def _results(results: Mapping | str | Path) -> tuple[Mapping, str | None]:
    """(results object, the file it came from)."""
    if isinstance(results, Mapping):
        return results, None
    path = Path(results)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the evaluation results ({exc})") from exc
    return data, str(path)


def _cell(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and value != value):  # absent or NaN
        return "—"
    if kind == "int":
        return str(int(value))
    return f"{100 * value:.2f}" if kind == "pct" else f"{value:.4f}"


def evaluation_section(results: Mapping | str | Path) -> str:
    """The "## Evaluation" section for results.json (its path or contents): per set, the
    mean over its generators (results.json "average") of the headline metrics."""
    data, source = _results(results)
    sets = data.get("sets")
    if not isinstance(sets, Mapping):
        raise ValueError(f"{source or 'evaluation results'}: no \"sets\" mapping; not a results.json of "
                         f"pipeline.evaluation")
    ckpt = data.get("checkpoint") or {}
    lines = [EVAL_HEADING, ""]
    if ckpt:
        lines += [f"Scored checkpoint: `{ckpt.get('path')}` (sha256 `{str(ckpt.get('sha256'))[:16]}`)."]
    protocol = (data.get("protocol") or {}).get("name")
    counts = data.get("counts") or {}
    if counts:
        lines += [f"Images: {counts.get('expected')} expected, {counts.get('scored')} scored, "
                  f"{counts.get('failed')} failed" + (f"; protocol `{protocol}`." if protocol else ".")]
    lines += ["", "Mean over the generators of each set. Accuracies in %: *Acc* leaves unparseable answers out "
              "(the reference's convention), *Acc (strict)* counts them as wrong. AUC and AP use the CPM's "
              "p(fake); CSS is the reasoning's similarity to the reference text.", "",
              "| Set | " + " | ".join(h for _, h, _ in EVAL_COLUMNS) + " |",
              "|---|" + "---|" * len(EVAL_COLUMNS)]
    for name, metrics in sets.items():
        avg = (metrics or {}).get("average") or {}
        lines.append(f"| {name} | " + " | ".join(_cell(avg.get(k), kind) for k, _, kind in EVAL_COLUMNS) + " |")
    lines += ["", f"Full results: `{source}` and results.md next to it." if source else
              "Full results: that run's results.json and results.md."]
    return "\n".join(lines) + "\n"


def update_card_evaluation(folder: str | Path, results: Mapping | str | Path) -> Path:
    """Add or replace the "## Evaluation" section of folder/README.md from `results`
    (a results.json path or its contents); every other section stays as it was."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model card to update (write_model_card writes one)")
    text = path.read_text(encoding="utf-8")
    section = evaluation_section(results)
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == EVAL_HEADING), None)
    if start is None:
        return _write(path, text.rstrip("\n") + "\n\n" + section)
    # The section ends at the next heading of the same or a higher level.
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("# ", "## "))), len(lines))
    tail = "".join(lines[end:])
    return _write(path, "".join(lines[:start]) + section + ("\n" + tail if tail else ""))


def _write(path: Path, text: str) -> Path:
    write_atomic(path, text)
    return path
