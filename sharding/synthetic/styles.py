"""Per-source "physics" of the synthetic MMFR: how each source's images look.

Every training source and evaluation generator gets a `SourceStyle`: the file
formats it ships, the sizes it produces, how noisy its images are, and which
generator trace its fakes carry. The traces are what makes the synthetic task
learnable and uneven across generators, like the real one:

* DiffusionDB (the training fakes) carries a fixed 8x8 "VAE up-sampling"
  fingerprint tile. Stable Diffusion uses the very same tile, PixArt (which
  really does reuse the SD VAE) mostly the same one, Kandinsky and Midjourney
  a blend, so a detector trained on DiffusionDB transfers well to them.
* IF (pixel-space x4 up-sampler) and FLUX (16x16 patches) have periodic traces
  at other periods: the spectral energy lands on related frequencies but the
  pattern itself differs, so transfer is partial at best.
* DALL-E 3 and GPT-4o carry only a faint blend of the tile, GPT-4o also has
  camera-like noise: the hard cases.
* StyleGAN-XL leaves non-grid spectral peaks (sinusoidal ripples); GigaGAN
  leaves colour banding, over-smoothed texture and a weak period-2 checker.

Tile fingerprints are seeded from their key name, not from the dataset seed,
so a generator looks the same in every synthetic dataset.
"""
from __future__ import annotations

from dataclasses import dataclass

from sharding.schema import GENERATORS


@dataclass(frozen=True)
class SourceStyle:
    """How the images of one source (training source or eval generator) are made."""

    fake_format: str
    """Encoder used for the fakes of this source: "png", "jpeg" or "webp"."""
    real_format: str
    """Encoder used for the reals of this source: "png" or "jpeg"."""
    tile_period: int = 0
    """Period in pixels of the additive up-sampling fingerprint tile; 0 = none."""
    tile_key: str = ""
    """Name seeding this source's own fingerprint tile (same key = same tile)."""
    tile_mix: float = 0.0
    """Fraction of the DiffusionDB tile blended into this source's own tile
    (only meaningful when `tile_period` is 8, the DiffusionDB period)."""
    tile_strength: float = 0.0
    """RMS amplitude of the tile in 8-bit grey levels (before per-image jitter)."""
    fake_noise: tuple[float, float] = (0.5, 1.5)
    """Range of the per-image noise sigma of the fakes (grey levels)."""
    real_noise: tuple[float, float] = (2.0, 5.0)
    """Range of the per-image sensor-noise sigma of the reals (grey levels)."""
    blur_passes: int = 0
    """Passes of a [1,2,1] blur applied to the fakes (over-smooth texture)."""
    quant_step: float = 0.0
    """Colour quantisation step of the fakes in grey levels (banding); 0 = none."""
    gratings: tuple[tuple[float, float], ...] = ()
    """Sinusoidal ripples of the fakes as (fx, fy) in cycles per pixel."""
    grating_strength: float = 0.0
    """Amplitude of each ripple in grey levels."""
    fake_quality: int = 92
    """Encoder quality for lossy fake formats (jpeg/webp)."""
    real_quality: tuple[int, int] = (78, 95)
    """Range of the JPEG quality of the reals (inclusive)."""
    fake_sizes: tuple[tuple[int, int], ...] = ((8, 8),)
    """Candidate (width, height) of the fakes, in eighths of --image-size."""
    real_sizes: tuple[tuple[int, int], ...] = ((8, 8), (8, 8), (10, 8), (8, 10), (9, 8), (8, 9))
    """Candidate (width, height) of the reals, in eighths of --image-size."""
    artifact_phrase: str = "a faint repeating grid"
    """How the reasoning texts describe this generator's trace."""


# The tile the training fakes carry; other sources blend it in via tile_mix.
TRAIN_TILE_KEY = "sd-vae"
TRAIN_TILE_PERIOD = 8

# Trace strengths (RMS grey levels) are 4x what they first were (training tile
# 5 -> 20), every source scaled alike, so which generators share the training
# trace, and how strongly, is unchanged. At 1x a randomly initialised tiny model
# (launch/demo.py, 250 steps) wrote the same answer for every image; at 3x its
# decision still did not depend on the image; at 4x it reads the trace
# (first-attribute AUC 0.99 on held-out training images).
TRAIN_STYLES: dict[str, SourceStyle] = {
    # Only the fake half of "diffusiondb" and the real half of "laion" is used.
    "diffusiondb": SourceStyle(
        fake_format="png", real_format="jpeg",
        tile_period=TRAIN_TILE_PERIOD, tile_key=TRAIN_TILE_KEY, tile_mix=1.0, tile_strength=20.0,
        fake_sizes=((8, 8), (8, 8), (8, 8), (10, 8), (8, 10)),
    ),
    "laion": SourceStyle(fake_format="png", real_format="jpeg"),
}

EVAL_STYLES: dict[str, SourceStyle] = {
    "stablediffusion": SourceStyle(
        fake_format="png", real_format="jpeg",
        tile_period=8, tile_key=TRAIN_TILE_KEY, tile_mix=1.0, tile_strength=18.0,
    ),
    "dalle3": SourceStyle(
        fake_format="webp", real_format="jpeg",
        tile_period=8, tile_key="dalle3", tile_mix=0.4, tile_strength=16.0,
        fake_noise=(1.0, 2.5), fake_sizes=((8, 8), (10, 8), (8, 10)),
        artifact_phrase="a subtle waxy sheen",
    ),
    "if": SourceStyle(
        fake_format="png", real_format="png",
        tile_period=4, tile_key="if-sr", tile_strength=16.0,
        artifact_phrase="a fine lattice from up-sampling",
    ),
    "midjourney": SourceStyle(
        fake_format="jpeg", real_format="jpeg",
        tile_period=8, tile_key="midjourney", tile_mix=0.6, tile_strength=16.0, fake_quality=92,
        fake_sizes=((8, 8), (10, 8), (8, 10)),
        artifact_phrase="an over-polished, painterly finish",
    ),
    "kandinsky": SourceStyle(
        fake_format="png", real_format="jpeg",
        tile_period=8, tile_key="movq", tile_mix=0.6, tile_strength=16.0,
    ),
    "pixart": SourceStyle(
        fake_format="png", real_format="jpeg",
        tile_period=8, tile_key="pixart", tile_mix=0.8, tile_strength=16.0,
    ),
    "flux": SourceStyle(
        fake_format="png", real_format="png",
        tile_period=16, tile_key="flux-vae", tile_strength=16.0,
        artifact_phrase="a coarse patch-like grid",
    ),
    "gpt4o": SourceStyle(
        fake_format="png", real_format="png",
        tile_period=8, tile_key="gpt4o", tile_mix=0.15, tile_strength=4.0,
        fake_noise=(2.0, 4.5), fake_sizes=((8, 8), (10, 8), (8, 10)),
        artifact_phrase="an almost photographic grain",
    ),
    "styleganxl": SourceStyle(
        fake_format="png", real_format="jpeg",
        gratings=((0.31, 0.0), (0.0, 0.19), (0.23, 0.23)), grating_strength=12.0,
        fake_noise=(1.0, 2.0),
        artifact_phrase="faint wave-like ripples",
    ),
    "gigagan": SourceStyle(
        fake_format="png", real_format="jpeg",
        tile_period=2, tile_key="gigagan", tile_strength=8.0,
        blur_passes=2, quant_step=10.0, fake_noise=(0.3, 0.8),
        artifact_phrase="visible colour banding",
    ),
}

if tuple(EVAL_STYLES) != GENERATORS:  # pragma: no cover - guards a future edit
    raise RuntimeError("EVAL_STYLES must list exactly schema.GENERATORS, in order")

FORMAT_EXTENSIONS: dict[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}
"""File extension written for each encoder."""
