"""Versioned, replaceable prompt files of `fakereasoning-annotate requests`.

A prompt file is a JSON object:
    {"version": "...", "description": "...", "fake": "prompt text", "real": "prompt text"}
The packaged default is `prompts/mmfr-v1.json` (written for this project);
`--prompt FILE` replaces it. The version is recorded in every request's index
line, in the report and in every conversation record `collect` writes, so an
annotation can always be traced to the exact wording that produced it.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

DEFAULT_PROMPT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts", "mmfr-v1.json")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class PromptSet:
    """The two prompts of one version."""

    version: str
    """Short identifier (letters, digits, '.', '_', '-'), recorded with every request."""
    fake: str
    """Prompt sent with images of the fake label (1_fake)."""
    real: str
    """Prompt sent with images of the real label (0_real)."""
    path: str
    """File the prompts were read from."""

    def text(self, label: int) -> str:
        return self.fake if label == 1 else self.real


class PromptError(ValueError):
    """A prompt file that cannot be used; the message names the file and the reason."""


def load_prompts(path: str | None = None) -> PromptSet:
    """Read and check a prompt file (the packaged default when `path` is None)."""
    path = path or DEFAULT_PROMPT_FILE
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise PromptError(f"{path}: cannot read the prompt file: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PromptError(f"{path}: not a JSON prompt file: {exc}") from None
    if not isinstance(data, dict):
        raise PromptError(f"{path}: the top level must be an object with version, fake and real")
    version = data.get("version")
    if not isinstance(version, str) or not _VERSION.match(version):
        raise PromptError(f"{path}: 'version' must be a short identifier (letters, digits, '.', '_', '-'), "
                          f"got {version!r}")
    for key in ("fake", "real"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise PromptError(f"{path}: '{key}' must be the non-empty prompt text for that label")
    return PromptSet(version=version, fake=data["fake"], real=data["real"], path=os.path.abspath(path))
