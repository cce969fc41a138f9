"""The part every command line of the pipeline shares: build and validate the
config, and answer `--check` (print it and stop) and a bad value (exit status 2
with `error: <reason>`) the same way in training and evaluation."""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

from common.config_loading import ConfigError

C = TypeVar("C")

EXIT_BAD_CONFIG = 2
"""A config value, override or input path is wrong; the message names which."""


def checked_config(build: Callable[[], C], check: bool) -> C | int:
    """The validated config that `build()` returns (it raises ConfigError on a
    bad value or input path); or an exit status for the command to return: 2
    after printing the error, 0 after printing the config as YAML (--check)."""
    try:
        cfg = build()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if check:
        import yaml  # only --check prints

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    return cfg
