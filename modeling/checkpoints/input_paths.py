"""Input paths checked for existence and kind before anything is loaded.

A path that is missing, of the wrong kind (a file where a folder is expected,
a folder without the file that makes it a model folder) or holds a damaged
safetensors file is reported with the field that named it and the path, e.g.
`model.llm.path='/models/x': does not exist (expected a model folder holding config.json)`,
instead of whatever the first library to touch it says (transformers takes a
missing folder for a hub repo id). `launch/train.py --check`, training start-up
and EvalConfig.validate run these checks; the loaders keep their own checks too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modeling.checkpoints.tensor_io import CheckpointError, safetensors_names, weight_files
from modeling.config import ModelConfig
from common.config_loading import ConfigError


@dataclass(frozen=True)
class PathKind:
    """What a path must be: a folder holding at least one of `markers`, or a file."""

    what: str
    """The kind in words, for the message."""
    folder: bool
    """A folder (True) or a file (False)."""
    markers: tuple[str, ...] = ()
    """A folder must hold at least one of these files (none: any folder)."""

    def expected(self) -> str:
        return f"{self.what} holding {' or '.join(self.markers)}" if self.markers else self.what


MODEL_FOLDER = PathKind("a model folder", True, ("config.json",))
TOKENIZER_FOLDER = PathKind("a tokenizer folder", True, ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
WEIGHT_FILE = PathKind("a weight file (.pth, .pt, .bin or .safetensors)", False)
FILE = PathKind("a file", False)


def path_problem(path: str | Path, kind: PathKind) -> str | None:
    """Why `path` is not of `kind` (None when it is); callers add the field and raise their own error."""
    p = Path(path)
    if not p.exists():
        return f"does not exist (expected {kind.expected()})"
    if kind.folder and not p.is_dir():
        return f"is a file, expected {kind.expected()}"
    if not kind.folder and not p.is_file():
        return f"is a folder, expected {kind.expected()}"
    if kind.markers and not any((p / m).is_file() for m in kind.markers):
        return f"holds no {' or '.join(kind.markers)}, so it is not {kind.what}"
    return None


def require(field: str, path: str | Path, kind: PathKind) -> Path:
    """`path` as a Path, or a ConfigError naming `field`, the path and the expected kind."""
    problem = path_problem(path, kind)
    if problem is not None:
        raise ConfigError(f"{field}={str(path)!r}: {problem}")
    return Path(path)


def check_safetensors_headers(field: str, files) -> None:
    """Read the header of every .safetensors file among `files` (cheap: no tensor is
    read); a truncated or damaged one is a ConfigError naming the field and the file."""
    for f in files:
        if Path(f).suffix != ".safetensors":
            continue
        try:
            safetensors_names(f)
        except CheckpointError as exc:
            raise ConfigError(f"{field}: {exc}") from None


def require_model_folder(field: str, path: str | Path) -> Path:
    """A transformers-style model folder: config.json, its weight files present and
    their safetensors headers readable."""
    folder = require(field, path, MODEL_FOLDER)
    try:
        files = weight_files(folder)
    except CheckpointError as exc:
        raise ConfigError(f"{field}={str(path)!r}: {exc}") from None
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"{field}={str(path)!r}: {missing[0]} (listed by the weight index) does not exist")
    check_safetensors_headers(field, files)
    return folder


def check_model_paths(cfg: ModelConfig) -> None:
    """Every local path of the model section: llm.path and clip.path are model
    folders; dino.path is the official .pth (or a .safetensors with its keys) or,
    with the transformers backend, also a Dinov2Model folder."""
    if cfg.llm.path:
        require_model_folder("model.llm.path", cfg.llm.path)
    if cfg.clip.path:
        require_model_folder("model.clip.path", cfg.clip.path)
    if cfg.dino.path:
        dino = Path(cfg.dino.path)
        if cfg.dino_backend == "transformers" and dino.is_dir():
            require_model_folder("model.dino.path", dino)
        else:
            require("model.dino.path", dino, WEIGHT_FILE)
            check_safetensors_headers("model.dino.path", [dino])
