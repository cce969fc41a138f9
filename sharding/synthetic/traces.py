"""Pixels of the synthetic MMFR: scene content, generator traces, encoding.

Content is the same process for reals and fakes (gradient backgrounds, soft
shapes, directional light, low-frequency texture), so content alone does not
give the label away; what differs is the finishing: reals get camera-like
sensor noise and JPEG compression, fakes get their generator's trace (see
`styles.py`). Everything is numpy-vectorised on small images, and every random
draw comes from the generator passed in, so one image depends only on its seed.
"""
from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from sharding.synthetic.styles import TRAIN_TILE_KEY, TRAIN_TILE_PERIOD, SourceStyle

# Named colours: the reasoning texts mention them, so a caption can be right or
# wrong about the picture (BLEU/ROUGE then measure something).
PALETTE: dict[str, tuple[int, int, int]] = {
    "crimson": (190, 30, 45),
    "orange": (235, 130, 40),
    "golden": (225, 185, 60),
    "olive": (120, 130, 50),
    "green": (60, 150, 70),
    "teal": (40, 140, 140),
    "sky-blue": (110, 170, 225),
    "navy": (30, 45, 110),
    "violet": (130, 70, 170),
    "pink": (230, 140, 170),
    "brown": (120, 80, 50),
    "grey": (128, 128, 128),
    "ivory": (235, 230, 210),
    "charcoal": (50, 50, 55),
}
COLOUR_NAMES: tuple[str, ...] = tuple(PALETTE)

# Direction the light comes from, as (name, unit vector in image x/y, y down).
LIGHT_DIRECTIONS: tuple[tuple[str, tuple[float, float]], ...] = (
    ("upper left", (-0.707, -0.707)),
    ("top", (0.0, -1.0)),
    ("upper right", (0.707, -0.707)),
    ("right", (1.0, 0.0)),
    ("lower right", (0.707, 0.707)),
    ("bottom", (0.0, 1.0)),
    ("lower left", (-0.707, 0.707)),
    ("left", (-1.0, 0.0)),
)
SHAPE_KINDS: tuple[str, ...] = ("round", "rectangular")


@dataclass(frozen=True)
class SceneFacts:
    """What was drawn, for the reasoning texts to talk about."""

    background: tuple[str, str]
    """Colour names of the two ends of the background gradient."""
    light: str
    """Where the light comes from ("upper left", ...)."""
    shapes: tuple[tuple[str, str], ...]
    """(kind, colour name) of each foreground shape, largest first."""
    width: int
    height: int


def _blur121(x: np.ndarray, passes: int) -> np.ndarray:
    """Separable [1,2,1]/4 blur over the first two axes, edge-replicated."""
    for _ in range(passes):
        p = np.pad(x, ((1, 1), (0, 0)) + ((0, 0),) * (x.ndim - 2), mode="edge")
        x = 0.25 * p[:-2] + 0.5 * p[1:-1] + 0.25 * p[2:]
        p = np.pad(x, ((0, 0), (1, 1)) + ((0, 0),) * (x.ndim - 2), mode="edge")
        x = 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]
    return x


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency random field in about [-1, 1]: a coarse grid, bilinearly upsampled."""
    grid = rng.standard_normal((cells + 1, cells + 1))
    ys = np.linspace(0.0, cells, h)
    xs = np.linspace(0.0, cells, w)
    y0 = np.minimum(ys.astype(int), cells - 1)
    x0 = np.minimum(xs.astype(int), cells - 1)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    g00 = grid[y0][:, x0]
    g01 = grid[y0][:, x0 + 1]
    g10 = grid[y0 + 1][:, x0]
    g11 = grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - fy) * (1 - fx) + g01 * (1 - fy) * fx + g10 * fy * (1 - fx) + g11 * fy * fx) / 1.5


def _jitter_colour(rng: np.random.Generator, name: str) -> np.ndarray:
    jitter = rng.normal(0.0, 12.0, 3)
    return np.clip(np.asarray(PALETTE[name], dtype=np.float32) + jitter, 0, 255).astype(np.float32)


def render_content(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, SceneFacts]:
    """Draw a random scene as float32 HxWx3 in grey levels, and describe it."""
    u = (np.arange(width, dtype=np.float32) / max(width - 1, 1) - 0.5)[None, :]
    v = (np.arange(height, dtype=np.float32) / max(height - 1, 1) - 0.5)[:, None]

    bg_names = tuple(COLOUR_NAMES[i] for i in rng.choice(len(COLOUR_NAMES), size=2, replace=False))
    c0, c1 = _jitter_colour(rng, bg_names[0]), _jitter_colour(rng, bg_names[1])
    angle = rng.uniform(0.0, 2 * np.pi)
    t = np.clip(0.5 + (u * np.float32(np.cos(angle)) + v * np.float32(np.sin(angle))), 0.0, 1.0)
    img = c0 + (c1 - c0) * t[..., None]

    # Low-frequency texture, partly colour-correlated like real surfaces.
    tex = _smooth_field(rng, height, width, int(rng.integers(3, 7))).astype(np.float32)
    img += (np.float32(rng.uniform(6.0, 18.0)) * tex)[..., None] * rng.uniform(0.7, 1.0, 3).astype(np.float32)

    n_shapes = int(rng.integers(1, 5))
    light_name, (lx, ly) = LIGHT_DIRECTIONS[int(rng.integers(len(LIGHT_DIRECTIONS)))]
    shapes: list[tuple[float, str, str]] = []
    for _ in range(n_shapes):
        kind = SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))]
        colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        cx, cy = rng.uniform(-0.35, 0.35, 2)
        rx, ry = rng.uniform(0.08, 0.3, 2)
        fill = _jitter_colour(rng, colour)
        edge = rng.uniform(1.5, 3.0) / (min(rx * width, ry * height) + 1e-6)
        # Work on the shape's bounding box only: most pixels are untouched.
        x0 = max(int((cx - rx + 0.5) * (width - 1)) - 1, 0)
        x1 = min(int((cx + rx + 0.5) * (width - 1)) + 2, width)
        y0 = max(int((cy - ry + 0.5) * (height - 1)) - 1, 0)
        y1 = min(int((cy + ry + 0.5) * (height - 1)) + 2, height)
        du = (u[:, x0:x1] - np.float32(cx)) / np.float32(rx)
        dv = (v[y0:y1] - np.float32(cy)) / np.float32(ry)
        d = np.sqrt(du * du + dv * dv) if kind == "round" else np.maximum(np.abs(du), np.abs(dv))
        # Soft, anti-aliased edge about one pixel wide.
        alpha = np.clip((1.0 - d) / np.float32(edge), 0.0, 1.0)[..., None]
        # Shading across the shape follows the global light direction.
        shade = 1.0 + 0.35 * np.clip(du * np.float32(lx) + dv * np.float32(ly), -1.0, 1.0)
        patch = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = patch + alpha * (fill * shade[..., None] - patch)
        shapes.append((float(rx * ry), kind, colour))

    # Global illumination: brighter towards the light.
    img *= (1.0 + 0.25 * (u * np.float32(lx) + v * np.float32(ly)))[..., None]
    shapes.sort(key=lambda s: -s[0])
    facts = SceneFacts(
        background=(bg_names[0], bg_names[1]),
        light=light_name,
        shapes=tuple((k, c) for _, k, c in shapes),
        width=width,
        height=height,
    )
    return img, facts


@lru_cache(maxsize=None)
def fingerprint_tile(key: str, period: int) -> np.ndarray:
    """Zero-mean, unit-RMS period x period x 3 tile, fixed by its key."""
    rng = np.random.default_rng(zlib.crc32(f"{key}/{period}".encode()))
    tile = rng.standard_normal((period, period, 3)).astype(np.float32)
    # Mostly luminance with some chroma: up-sampling layers act on all channels.
    tile = 0.7 * tile.mean(axis=2, keepdims=True) + 0.3 * tile
    tile -= tile.mean(axis=(0, 1), keepdims=True)
    tile /= np.sqrt((tile**2).mean()) + 1e-8
    tile.setflags(write=False)
    return tile


@lru_cache(maxsize=None)
def source_tile(style: SourceStyle) -> np.ndarray:
    """The tile a source adds: its own fingerprint blended with the training one."""
    own = fingerprint_tile(style.tile_key, style.tile_period)
    if style.tile_period != TRAIN_TILE_PERIOD or style.tile_mix <= 0.0:
        return own
    train = fingerprint_tile(TRAIN_TILE_KEY, TRAIN_TILE_PERIOD)
    mixed = style.tile_mix * train + (1.0 - style.tile_mix) * own
    mixed = mixed / (np.sqrt((mixed**2).mean()) + 1e-8)
    mixed.setflags(write=False)
    return mixed


def apply_fake_trace(rng: np.random.Generator, img: np.ndarray, style: SourceStyle) -> np.ndarray:
    """Finish a scene the way this source's generator would."""
    h, w, _ = img.shape
    if style.blur_passes:
        img = _blur121(img, style.blur_passes)
    sigma = rng.uniform(*style.fake_noise)
    img = img + rng.normal(0.0, sigma, (h, w, 1)).astype(np.float32)
    if style.tile_period:
        p = style.tile_period
        tile = source_tile(style)
        pattern = np.tile(tile, (-(-h // p), -(-w // p), 1))[:h, :w]
        # Up-sampling artefacts scale with the signal they decode.
        luma = img.mean(axis=2, keepdims=True) / 255.0
        strength = style.tile_strength * rng.uniform(0.75, 1.25)
        img = img + strength * pattern * (0.6 + 0.8 * np.clip(luma, 0.0, 1.0))
    if style.gratings:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        for fx, fy in style.gratings:
            phase = rng.uniform(0.0, 2 * np.pi)
            amp = style.grating_strength * rng.uniform(0.75, 1.25)
            img = img + (amp * np.cos(2 * np.pi * (fx * xx + fy * yy) + phase))[..., None]
    if style.quant_step:
        img = np.round(img / style.quant_step) * style.quant_step
    return img


def apply_real_finish(rng: np.random.Generator, img: np.ndarray, style: SourceStyle) -> np.ndarray:
    """Camera-like finishing: slight lens blur and demosaic-correlated sensor noise."""
    h, w, _ = img.shape
    if rng.random() < 0.5:
        img = 0.5 * img + 0.5 * _blur121(img, 1)
    sigma = rng.uniform(*style.real_noise)
    noise = rng.standard_normal((h, w, 3)).astype(np.float32)
    noise = 0.6 * noise + 0.4 * noise.mean(axis=2, keepdims=True)
    noise = _blur121(noise, 1) * 1.6  # mild spatial correlation, like demosaicing
    return img + sigma * noise


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str, quality: int) -> bytes:
    """Encode with fixed parameters so that identical pixels give identical bytes.

    Pillow writes no timestamps for these formats; every encoder option that
    changes the output is spelled out rather than left to a library default.
    """
    image = Image.fromarray(pixels)
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=6, optimize=False)
    elif fmt == "jpeg":
        image.save(buf, format="JPEG", quality=int(quality), subsampling=2, optimize=False, progressive=False)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=int(quality), method=4, lossless=False, exact=False)
    else:
        raise ValueError(f"unknown synthetic image format {fmt!r} (expected png, jpeg or webp)")
    return buf.getvalue()


def pick_size(rng: np.random.Generator, sizes: tuple[tuple[int, int], ...], image_size: int) -> tuple[int, int]:
    """Pick (width, height) from eighths of the base size; always a multiple of 8."""
    wm, hm = sizes[int(rng.integers(len(sizes)))]
    unit = image_size // 8
    return wm * unit, hm * unit


def render_image(
    rng: np.random.Generator, style: SourceStyle, label: int, image_size: int
) -> tuple[bytes, str, SceneFacts]:
    """Render one image of a source: (encoded bytes, format, scene facts)."""
    width, height = pick_size(rng, style.fake_sizes if label else style.real_sizes, image_size)
    img, facts = render_content(rng, width, height)
    if label:
        fmt = style.fake_format
        pixels = to_uint8(apply_fake_trace(rng, img, style))
        quality = style.fake_quality
    else:
        fmt = style.real_format
        pixels = to_uint8(apply_real_finish(rng, img, style))
        quality = int(rng.integers(style.real_quality[0], style.real_quality[1] + 1))
    return encode(pixels, fmt, quality), fmt, facts
