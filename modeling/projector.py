"""Projectors from a vision tower's width to the LLM width (LLaVA's `mlp2x_gelu`)."""
from __future__ import annotations

from torch import nn

from modeling.config import ConfigError


def build_projector(projector_type: str, in_dim: int, out_dim: int) -> nn.Sequential:
    """`mlp2x_gelu`: Linear(in, out) -> GELU -> Linear(out, out). The Sequential keeps
    LLaVA's state-dict keys `0.*` and `2.*` (mm_projector.{0,2} in reference files)."""
    if projector_type != "mlp2x_gelu":
        raise ConfigError(f"model.projector_type={projector_type!r} is not supported "
                          f"(only 'mlp2x_gelu')")
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
