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
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

from modeling.config import ModelConfig


def pad_colour(mean) -> tuple[int, int, int]:
    """The colour expand2square fills with: each mean channel times 255, truncated
    (as the reference computes it; rounding would shift one level on two channels)."""
    return tuple(int(m * 255) for m in mean)


class ImageProcessor:
    """`ImageProcessor(cfg)(pil_image) -> FloatTensor[3, S, S]` with S = cfg.image_size."""

    def __init__(self, config: ModelConfig):
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
        """LLaVA's expand2square: centre the image on a square canvas of the pad colour."""
        w, h = image.size
        if w == h:
            return image
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), self.fill)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        return canvas

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"ImageProcessor expects a PIL image, got {type(image).__name__}")
        image = self.pad_to_square(self.to_rgb(image))
        # The image is square here, so the CLIP processor's shortest-edge resize
        # gives S x S and its centre crop is a no-op: one resize is the same
        # tensor. PIL's resize to the current size is a copy, so skipping it is too.
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # 3, H, W
        return torch.addcmul(self._shift, pixels.float(), self._scale).contiguous()

    def batch(self, images) -> torch.Tensor:
        """Stack several images into [B, 3, S, S]."""
        return torch.stack([self(im) for im in images])
