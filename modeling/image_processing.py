"""Image -> tensor exactly as the paper recipe: pad to square, resize, CLIP-normalise.

One tensor feeds both towers (DESIGN section 5). Padding uses the CLIP mean
colour (LLaVA's expand2square) so that padded pixels normalise to ~0.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

from modeling.config import ModelConfig


class ImageProcessor:
    """`ImageProcessor(cfg)(pil_image) -> FloatTensor[3, S, S]` with S = cfg.image_size."""

    def __init__(self, config: ModelConfig):
        self.size = int(config.image_size)
        self.mean = tuple(float(x) for x in config.image_mean)
        self.std = tuple(float(x) for x in config.image_std)
        self.fill = tuple(int(round(m * 255)) for m in self.mean)
        # (x / 255 - mean) / std folded into one multiply-add on the uint8 pixels:
        # this runs per image in every loader worker, so it is worth the two lines.
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in self.std]).view(3, 1, 1)
        self._shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)]).view(3, 1, 1)

    def to_rgb(self, image: Image.Image) -> Image.Image:
        """Apply EXIF orientation, then convert any mode (L, P, RGBA, CMYK, I;16, ...) to RGB."""
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            # 16/32-bit greyscale: convert("RGB") would clip to 255; rescale the range instead.
            arr = np.asarray(image, dtype=np.float64)
            peak = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
            arr = np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8)
            image = Image.fromarray(arr, mode="L")
        if image.mode != "RGB":
            image = image.convert("RGB")
        return image

    def pad_to_square(self, image: Image.Image) -> Image.Image:
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
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # 3, H, W
        return torch.addcmul(self._shift, pixels.float(), self._scale).contiguous()

    def batch(self, images) -> torch.Tensor:
        """Stack several images into [B, 3, S, S]."""
        return torch.stack([self(im) for im in images])
