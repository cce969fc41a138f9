"""Image -> tensor exactly as the reference recipe: pad to square, resize, CLIP-normalise.

One tensor feeds both towers (docs/architecture.md, section 4). The reference (a LLaVA fork)
does `Image.open(path).convert("RGB")`, LLaVA's `expand2square` with the CLIP
mean colour, then transformers' CLIP image processor (shortest edge -> S
bicubic, centre crop S, x/255, CLIP mean/std). This module reproduces that
tensor to within float32 rounding (tests/unit/modeling/test_image_processing.py
checks it against transformers' own PIL CLIP processor), so that the released
weights see the inputs they were trained on:

- no EXIF orientation unless `ModelConfig.apply_exif_orientation` is set (the
  reference never reads the tag);
- every mode goes through PIL's `convert("RGB")` as in the reference: alpha
  is dropped (not composited on a background), 16/32-bit greyscale is clipped
  to 0..255 by PIL (not rescaled);
- the pad colour is the reference's `int(m * 255)` (truncation), i.e.
  (122, 116, 104) for CLIP's mean, not the rounded (123, 117, 104).

Hostile sizes: a 1 KB PNG can declare 1,000,000 x 1 pixels. Its decode is
small, but a square canvas of side max(w, h) is not, so every image is checked
against `ImageLimits` (longest side, aspect ratio) before it is decoded
(`open_image`) and before it is processed, and the canvas is never built: the
resize is done as Pillow does it (a horizontal pass, then a vertical pass, each
rounded to uint8) on the padded image's rows, giving the same tensor with at
most S x max(w, h) pixels in memory instead of max(w, h)^2
(`ImageProcessor.pad_and_resize`).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from modeling.config import ModelConfig


@dataclass
class ImageLimits:
    """Bounds on an image's declared size, checked before it is decoded or padded
    (the sharder's --max-side / --max-aspect-ratio default to the same values)."""

    max_side: int = 16384
    """Longest side in pixels; a larger image is refused (a named bad sample).
    16384 covers every camera and generator output in the supported sets."""
    max_aspect_ratio: float = 20.0
    """Longer side over shorter side; a larger ratio is refused. At 20:1 the
    content is already under 17 of the model's 336 pixel rows after padding."""

    def check(self, where: str = "image_limits") -> None:
        """Raise ValueError naming `where.<field>` for a bound that cannot be used."""
        if self.max_side < 1:
            raise ValueError(f"{where}.max_side: must be >= 1, got {self.max_side}")
        if not self.max_aspect_ratio >= 1:
            raise ValueError(f"{where}.max_aspect_ratio: must be >= 1, got {self.max_aspect_ratio}")


class ImageSizeError(ValueError):
    """An image whose declared size is outside `ImageLimits` (or empty)."""


def check_image_size(width: int, height: int, limits: ImageLimits) -> None:
    """Raise ImageSizeError when a `width` x `height` image is outside `limits`.

    The one size check of the training loader, the evaluation loader and anything
    else that turns bytes into model input (the sharder, which imports nothing
    from the project, applies the same bounds in sharding/images.py)."""
    if width < 1 or height < 1:
        raise ImageSizeError(f"{width}x{height} image: empty")
    longest, shortest = max(width, height), min(width, height)
    if longest > limits.max_side:
        raise ImageSizeError(f"{width}x{height} image: longest side {longest} > max_side={limits.max_side}")
    if longest > limits.max_aspect_ratio * shortest:
        raise ImageSizeError(f"{width}x{height} image: aspect ratio {longest / shortest:.4g}:1 > "
                             f"max_aspect_ratio={limits.max_aspect_ratio:g}")


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode image bytes after checking the size their header declares.

    Raises ImageSizeError (a ValueError) before any pixel is decoded, or PIL's
    own errors for undecodable bytes (OSError, SyntaxError, EOFError, ValueError,
    DecompressionBombError). The caller closes the image."""
    image = Image.open(io.BytesIO(data))
    try:
        check_image_size(*image.size, limits)
        image.load()
    except BaseException:
        image.close()
        raise
    return image


def pad_colour(mean) -> tuple[int, int, int]:
    """The colour expand2square fills with: each mean channel times 255, truncated
    (as the reference computes it; rounding would shift one level on two channels)."""
    return tuple(int(m * 255) for m in mean)


class ImageProcessor:
    """`ImageProcessor(cfg)(pil_image) -> FloatTensor[3, S, S]` with S = cfg.image_size."""

    def __init__(self, config: ModelConfig, limits: ImageLimits | None = None):
        self.limits = limits if limits is not None else ImageLimits()
        self.limits.check()
        self.band_bytes = 1 << 24  # padded rows resized at a time in pad_and_resize (about 16 MB)
        self.size = int(config.image_size)
        self.mean = tuple(float(x) for x in config.image_mean)
        self.std = tuple(float(x) for x in config.image_std)
        self.apply_exif_orientation = bool(config.apply_exif_orientation)
        self.fill = pad_colour(self.mean)
        # (x / 255 - mean) / std folded into one multiply-add on the uint8 pixels:
        # this runs per image in every loader worker, so it is worth the two lines.
        # It differs from the CLIP processor's two float steps by float32 rounding
        # only (max 1e-6 measured; the parity test bounds it at 1e-5).
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in self.std]).view(3, 1, 1)
        self._shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)]).view(3, 1, 1)

    def to_rgb(self, image: Image.Image) -> Image.Image:
        """Optionally apply the EXIF orientation, then PIL's `convert("RGB")` for any
        other mode (L, LA, P, RGBA, CMYK, I;16, ...), exactly as the reference does."""
        if self.apply_exif_orientation:
            image = ImageOps.exif_transpose(image)
        if image.mode != "RGB":
            image = image.convert("RGB")
        return image

    def pad_to_square(self, image: Image.Image) -> Image.Image:
        """LLaVA's expand2square: centre the image on a square canvas of the pad colour.
        (Kept for callers that want the padded image itself; `__call__` never builds it.)"""
        w, h = image.size
        if w == h:
            return image
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), self.fill)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        return canvas

    def open(self, data: bytes) -> Image.Image:
        """`open_image` under this processor's limits."""
        return open_image(data, self.limits)

    def pad_and_resize(self, image: Image.Image) -> Image.Image:
        """`pad_to_square(image).resize((S, S), BICUBIC)`, pixel for pixel, without the canvas.

        Pillow resizes in two passes, horizontal then vertical, rounding to uint8
        in between, and each output row of the horizontal pass depends on its
        input row only. So the padded canvas is resized a band of rows at a time
        (rows that are all pad colour stay that colour), into an S x side
        intermediate that the vertical pass then resizes. Peak memory is about
        S x side x 3 bytes plus one band, instead of side^2 x 3.
        """
        w, h = image.size
        s = self.size
        if w == h:
            return image if w == s else image.resize((s, s), Image.Resampling.BICUBIC)
        side = max(w, h)
        top, left = (side - h) // 2, (side - w) // 2
        rows = Image.new("RGB", (s, side), self.fill)  # the horizontal pass of the canvas
        if w > h:
            # Image rows span the whole canvas width; the rest is pad colour, unchanged by the pass.
            rows.paste(image if w == s else image.resize((s, h), Image.Resampling.BICUBIC), (0, top))
        else:
            # Every canvas row is pad | image row | pad: pad a band of rows, resize it, paste it.
            band = max(1, self.band_bytes // (3 * side))
            for y in range(0, h, band):
                n = min(band, h - y)
                strip = Image.new("RGB", (side, n), self.fill)
                strip.paste(image.crop((0, y, w, y + n)), (left, 0))
                rows.paste(strip if side == s else strip.resize((s, n), Image.Resampling.BICUBIC), (0, y))
        return rows if side == s else rows.resize((s, s), Image.Resampling.BICUBIC)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"ImageProcessor expects a PIL image, got {type(image).__name__}")
        check_image_size(*image.size, self.limits)  # before converting or padding anything
        # The padded image is square, so the CLIP processor's shortest-edge resize
        # gives S x S and its centre crop is a no-op: one resize is the same tensor.
        image = self.pad_and_resize(self.to_rgb(image))
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # 3, H, W
        return torch.addcmul(self._shift, pixels.float(), self._scale).contiguous()

    def batch(self, images) -> torch.Tensor:
        """Stack several images into [B, 3, S, S]."""
        return torch.stack([self(im) for im in images])
