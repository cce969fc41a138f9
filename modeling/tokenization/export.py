"""Saving a tokenizer so that every transformers version the project allows can load it.

transformers 5 writes two things into tokenizer_config.json that transformers 4
cannot read (checked on 4.50.3 and 4.57.6 against 5.24):
- `"tokenizer_class": "TokenizersBackend"`: 5's name for the tokenizers-backed
  class. transformers 4 has no class of that name, so AutoTokenizer raises
  "Tokenizer class TokenizersBackend does not exist or is not currently imported".
  `PreTrainedTokenizerFast` names the same class in both (in 5 it is an alias of
  TokenizersBackend), and both then read tokenizer.json as it is.
- `"extra_special_tokens": [...]`: 5 writes the extra special tokens as a list;
  4 reads that key as a dict of named tokens (`{"image_token": "<image>"}`) and
  fails on a list. Both read the list under its older name,
  `additional_special_tokens` (5 renames it back when loading).
Everything else 5 writes (e.g. `"backend": "tokenizers"`) 4 accepts as an unused
init argument; the added tokens and their flags live in tokenizer.json, which
both read. A tokenizer that 5 loaded from a folder also saves how it was loaded
(`is_local`, `local_files_only`); those say nothing about the tokenizer, and are
dropped, as transformers drops `name_or_path` and `device_map`.
"""
from __future__ import annotations

import json
from pathlib import Path

from common.atomic_files import write_atomic
TOKENIZER_CONFIG = "tokenizer_config.json"
# transformers 5's class name -> the name of the same class in transformers 4 and 5.
_PORTABLE_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}
# Loading arguments that transformers 5 keeps in init_kwargs and so writes back.
_LOADING_ARGUMENTS = ("is_local", "local_files_only")


def portable_tokenizer_config(config: dict) -> dict:
    """tokenizer_config.json contents that transformers 4 and 5 read alike (see the module docstring)."""
    out = {k: v for k, v in config.items() if k not in _LOADING_ARGUMENTS}
    if out.get("tokenizer_class") in _PORTABLE_CLASS:
        out["tokenizer_class"] = _PORTABLE_CLASS[out["tokenizer_class"]]
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):
        del out["extra_special_tokens"]
        if extra:
            out["additional_special_tokens"] = extra
    return out


def write_portable_config(path: Path) -> None:
    """Rewrite the tokenizer_config.json at `path` in the portable form."""
    config = json.loads(path.read_text(encoding="utf-8"))
    write_atomic(path, json.dumps(portable_tokenizer_config(config), indent=2, sort_keys=True, ensure_ascii=False)
                 + "\n")


def save_tokenizer(tokenizer, out_dir: str | Path) -> Path:
    """`tokenizer.save_pretrained(out_dir)`, then its tokenizer_config.json made portable; returns out_dir."""
    out = Path(out_dir)
    tokenizer.save_pretrained(str(out))
    write_portable_config(out / TOKENIZER_CONFIG)
    return out
