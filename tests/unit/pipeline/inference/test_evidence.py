"""Evidence maps: the grid is the fusion's input reduced as documented, it lines up
with the image (not transposed or flipped, padding accounted for), and the map in a
record is the one the forward pass consumed."""
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.inference.evidence import (
    AttentionCapture,
    Geometry,
    display_square,
    evidence_grid,
    render_overlay,
    top_regions,
)


def _planted(g: int, heads: int, r: int, c: int, weight: float = 0.5) -> torch.Tensor:
    """A softmax-like map [H, 1+N, 1+N] where every query puts `weight` on patch (r, c)."""
    n = g * g
    a = torch.full((heads, 1 + n, 1 + n), (1 - weight) / n)
    a[:, :, 1 + r * g + c] += weight
    return a / a.sum(-1, keepdim=True)


def test_grid_reduction_sums_to_one_and_keeps_row_major_layout():
    a = _planted(4, 3, r=1, c=3)
    grid = evidence_grid(a)
    assert grid.shape == (4, 4) and grid.sum() == pytest.approx(1.0, abs=1e-6)
    assert np.unravel_index(grid.argmax(), grid.shape) == (1, 3)
    # Exactly mean over heads and query patches of the patch block, renormalised.
    block = a[:, 1:, 1:].double().mean(dim=(0, 1))
    assert np.allclose(grid.ravel(), (block / block.sum()).numpy(), atol=1e-7)


def test_cls_column_is_dropped_as_the_fusion_drops_it():
    a = _planted(2, 1, 0, 0, weight=0.0)
    a[:, :, 0] += 10.0  # all the mass on CLS: dropped, the patch part still sums to 1
    a = a / a.sum(-1, keepdim=True)
    assert evidence_grid(a).sum() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("size,box,share", [
    ((120, 60), [20, 50, 40, 60], 0.5),   # wide: 30 px of padding above, cell rows 80..100 -> 50..70, clipped
    ((60, 120), [0, 80, 10, 100], 0.5),   # tall: 30 px of padding left, cell cols 20..40 -> -10..10, clipped
    ((90, 90), [15, 60, 30, 75], 0.0),    # square: no padding, 15 px cells
])
def test_top_region_box_in_image_pixels(size, box, share):
    """Cell (row 4, col 1) of a 6x6 grid, by hand: the square's cell shifted by the
    expand2square offset and clipped to the image, with the share that is padding."""
    geo = Geometry(*size)
    top = top_regions(evidence_grid(_planted(6, 2, r=4, c=1)), geo, 1)[0]
    assert (top["row"], top["col"], top["box"], top["padding_share"]) == (4, 1, box, share)


def test_overlay_hot_cell_on_a_wide_image_and_hatched_padding():
    """Wide image 120x60: side 120, image rows 30..90 of the square. A peak in a cell of
    the image area is the hottest region; padding rows are drawn grey, not heat."""
    g, geo = 4, Geometry(120, 60)
    square = display_square(Image.new("RGB", (120, 60), (0, 0, 0)), (122, 116, 104), side=120)
    grid = evidence_grid(_planted(g, 1, r=2, c=3))  # rows 60..90, cols 90..120: inside the image
    over = np.asarray(render_overlay(square, grid, geo), dtype=np.float32)
    lum = over.mean(axis=2)
    hot = lum[62:88, 92:118].mean()
    assert hot > lum[32:58, 2:88].mean() + 40  # the other image cells are darker
    pad = over[5:25, 5:115]  # the top padding band (rows 0..30)
    assert np.all(np.abs(pad[..., 0] - pad[..., 1]) < 1) and np.all(np.abs(pad[..., 1] - pad[..., 2]) < 1)
    assert top_regions(grid, geo, 1)[0]["padding_share"] == 0.0
    # A cell entirely in the top padding band reports a share of 1 and an empty box.
    corner = top_regions(evidence_grid(_planted(g, 1, r=0, c=0)), geo, 1)[0]
    assert corner["padding_share"] == 1.0 and corner["box"][1] == corner["box"][3] == 0


def test_capture_keeps_the_tensor_the_fusion_received(tiny_model):
    model, _ = tiny_model
    seen = []
    handle = model.fusion.register_forward_pre_hook(lambda m, args: seen.append(args[2].detach().clone()))
    try:
        px = torch.randn(2, 3, model.config.image_size, model.config.image_size)
        with AttentionCapture(model) as cap, torch.no_grad():
            model.encode_images(px)
            model.encode_images(px[:1])  # a second (forced) forward is not kept
    finally:
        handle.remove()
    assert cap.attention.shape[0] == 2 and torch.equal(cap.attention, seen[0].float())
