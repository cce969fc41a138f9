"""Evidence maps: where the model looked, from the attention its fusion module consumed.

The forgery-aware fusion module (modeling/fusion.py) turns DINOv2's last-block
softmax attention into a per-head bias of its cross-attention. That map is
the model's own account of which image regions relate to which, so it is what
`--evidence` shows. Exactly:

1. `AttentionCapture` keeps the third input of `model.fusion`'s forward (a
   forward pre-hook): the tensor the fusion actually received in this forward
   pass, [B, H, 1+N, 1+N] (H DINOv2 heads, the CLS token first, N = g x g patch
   tokens in row-major order: token 1 + r*g + c is the patch of grid row r, column c).
   Nothing is recomputed; only the first call of a capture is kept (a forced
   CPM forward of the same images would give the same map again).
2. `evidence_grid`: the fusion drops the CLS row and column; so does this. Of
   the remaining patch-to-patch block A[h, q, k], the map is the attention each
   key patch k receives, averaged over all heads h and all query patches q:
   m[k] = mean_h mean_q A[h, q, k], then normalised to sum to 1 over the grid.
   (Each row of A summed to 1 over CLS + patches before the CLS column was dropped;
   the normalisation removes the part that went to CLS.) Returned as [g, g] with
   m[r, c] the patch at grid row r, column c of the model's input square.
3. The model's input is the image padded to a square (expand2square, the image
   centred) and resized. So grid cell (r, c) covers the square's pixels
   [c*side/g, (c+1)*side/g) x [r*side/g, (r+1)*side/g), side = max(width, height);
   in the original image's coordinates that is shifted by the padding offset
   ((side - width) // 2, (side - height) // 2). `top_regions` reports cells in
   those image coordinates, clipped to the image, with the share of the cell
   that is padding. `render_overlay` draws the heat map over the padded square as
   the model saw it, and hatches the padding so that it reads as padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

# Side of the overlay PNG (the padded square is shown at this size).
DISPLAY_SIDE = 384
HEAT_ALPHA = 0.5


class AttentionCapture:
    """Context manager: `with AttentionCapture(model) as cap: ...; cap.attention` is the
    DINOv2 attention map [B, H, 1+N, 1+N] (float32, CPU) the fusion module received first."""

    def __init__(self, model):
        self.fusion = model.fusion
        self.attention: torch.Tensor | None = None
        self._handle = None

    def _hook(self, module, args):
        if self.attention is None:
            self.attention = args[2].detach().float().cpu()

    def __enter__(self) -> "AttentionCapture":
        self.attention = None
        self._handle = self.fusion.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def evidence_grid(attention: torch.Tensor | np.ndarray) -> np.ndarray:
    """One image's map [H, 1+N, 1+N] -> [g, g] float32 summing to 1 (module doc, step 2)."""
    a = np.asarray(attention, dtype=np.float64)
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"attention map must be [heads, 1+N, 1+N], got {a.shape}")
    n = a.shape[-1] - 1
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"attention map over {n} patches is not a square grid")
    received = a[:, 1:, 1:].mean(axis=(0, 1))
    total = received.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("attention map carries no weight over the patches")
    return (received / total).reshape(g, g).astype(np.float32)


@dataclass(frozen=True)
class Geometry:
    """Where the image sits in the model's square input."""

    width: int
    height: int

    @property
    def side(self) -> int:
        return max(self.width, self.height)

    @property
    def offset(self) -> tuple[int, int]:
        """(x, y) of the image's top-left corner on the padded square (expand2square)."""
        return (self.side - self.width) // 2, (self.side - self.height) // 2


def cell_box(r: int, c: int, g: int, geo: Geometry) -> tuple[float, float, float, float]:
    """Grid cell (r, c) as (x0, y0, x1, y1) in the padded square's pixels."""
    step = geo.side / g
    return c * step, r * step, (c + 1) * step, (r + 1) * step


def top_regions(grid: np.ndarray, geo: Geometry, k: int) -> list[dict[str, Any]]:
    """The k heaviest cells: row, column, weight, box in image pixels (clipped), padding share."""
    g = grid.shape[0]
    order = np.argsort(-grid, axis=None, kind="stable")[:k]
    ox, oy = geo.offset
    out = []
    for flat in order:
        r, c = divmod(int(flat), g)
        x0, y0, x1, y1 = cell_box(r, c, g, geo)
        ix0, iy0 = min(max(x0 - ox, 0), geo.width), min(max(y0 - oy, 0), geo.height)
        ix1, iy1 = min(max(x1 - ox, 0), geo.width), min(max(y1 - oy, 0), geo.height)
        inside = (ix1 - ix0) * (iy1 - iy0) / ((x1 - x0) * (y1 - y0))
        out.append({"row": r, "col": c, "weight": round(float(grid[r, c]), 6),
                    "box": [round(ix0), round(iy0), round(ix1), round(iy1)],
                    "padding_share": round(1.0 - inside, 4)})
    return out


def display_square(image: Image.Image, fill: tuple[int, int, int], side: int = DISPLAY_SIDE) -> np.ndarray:
    """The model's padded square at `side` pixels (uint8 [side, side, 3]), built by
    resizing the image first, so a huge image never becomes a huge canvas."""
    geo = Geometry(*image.size)
    scale = side / geo.side
    w, h = max(1, round(geo.width * scale)), max(1, round(geo.height * scale))
    small = image.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (side, side), fill)
    ox, oy = geo.offset
    canvas.paste(small, (round(ox * scale), round(oy * scale)))
    return np.array(canvas, dtype=np.uint8)


def heat_colours(grid: np.ndarray, side: int) -> np.ndarray:
    """The grid upsampled to side x side (each cell a block, no smoothing, so a cell's
    colour sits exactly over the pixels it covers), scaled min to max, coloured (inferno)."""
    from matplotlib import colormaps

    g = grid.shape[0]
    idx = (np.arange(side) * g) // side
    up = grid[idx][:, idx]
    lo, hi = float(up.min()), float(up.max())
    # Min-max: the map's contrast, not its absolute level (a near-uniform map stays dark).
    norm = (up - lo) / (hi - lo) if hi - lo > 1e-12 else np.zeros_like(up)
    return (colormaps["inferno"](norm)[..., :3] * 255).astype(np.uint8)


def render_overlay(square: np.ndarray, grid: np.ndarray, geo: Geometry, alpha: float = HEAT_ALPHA) -> Image.Image:
    """The heat map blended over the padded square, the padding hatched in grey."""
    square = np.asarray(square, dtype=np.uint8)  # the loader hands numpy arrays over as tensors
    side = square.shape[0]
    heat = heat_colours(grid, side).astype(np.float32)
    out = ((1 - alpha) * square.astype(np.float32) + alpha * heat).round().astype(np.uint8)
    img = Image.fromarray(out, "RGB")
    scale = side / geo.side
    ox, oy = geo.offset
    x0, y0 = round(ox * scale), round(oy * scale)
    x1, y1 = x0 + round(geo.width * scale), y0 + round(geo.height * scale)
    draw = ImageDraw.Draw(img)
    pads = []
    if x0 > 0:
        pads += [(0, 0, x0, side), (x1, 0, side, side)]
    if y0 > 0:
        pads += [(0, 0, side, y0), (0, y1, side, side)]
    for box in pads:
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        draw.rectangle(box, fill=(128, 128, 128))
        for t in range(-side, side, 12):  # diagonal hatch, clipped to the box
            draw.line([(box[0] + t, box[1]), (box[0] + t + (box[3] - box[1]), box[3])], fill=(170, 170, 170))
        draw.rectangle(box, outline=(90, 90, 90))
    if pads:  # the hatch may spill over the image edge; redraw the image area border
        img.paste(Image.fromarray(out[y0:y1, x0:x1], "RGB"), (x0, y0))
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 255, 255))
    return img
