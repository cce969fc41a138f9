"""ImageProcessor against the reference preprocessing, built here from its description.

The reference (a LLaVA fork) does, per image:
    Image.open(path).convert("RGB")             # no EXIF transpose
    expand2square(image, fill)                  # fill = tuple(int(x * 255) for x in image_mean)
    CLIPImageProcessor(...)(image)              # shortest edge S bicubic, centre crop S,
                                                # x / 255, CLIP mean/std
Here the last step is transformers' own PIL CLIP processor (`CLIPImageProcessorPil`,
the PIL/NumPy path the reference ran under transformers 4.x), configured as
openai/clip-vit-large-patch14-336's preprocessor config.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from modeling.config import CLIP_MEAN, CLIP_STD, ConfigError, ModelConfig
from modeling.image_processing import ImageProcessor

TOLERANCE = 1e-5  # float32 rounding of the fused multiply-add; a one-level pixel error is ~0.015


# ------------------------------------------------------------------ the reference
def clip_processor(size: int) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        do_resize=True, size={"shortest_edge": size}, resample=3,  # 3 = PIL bicubic
        do_center_crop=True, crop_size={"height": size, "width": size},
        do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
        do_convert_rgb=True)


def expand2square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def reference_square(path) -> Image.Image:
    """The reference's image right before the CLIP processor."""
    fill = tuple(int(x * 255) for x in CLIP_MEAN)
    return expand2square(Image.open(path).convert("RGB"), fill)


def reference_pixels(path, size: int) -> torch.Tensor:
    square = reference_square(path)
    return clip_processor(size)(images=square, return_tensors="pt")["pixel_values"][0]


# ------------------------------------------------------------------ test images
def make_image(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Noise with a gradient: every pixel differs, so resizing and padding errors show."""
    w, h = size
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w, dtype=np.float64)[None, :, None]
    rgb = np.clip(rng.normal(0, 40, (h, w, 3)) + ramp, 0, 255).astype(np.uint8)
    alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
    if mode == "RGB":
        return Image.fromarray(rgb)
    if mode == "RGBA":
        return Image.fromarray(np.concatenate([rgb, alpha], axis=2))
    if mode == "L":
        return Image.fromarray(rgb[..., 0])
    if mode == "LA":
        return Image.fromarray(np.concatenate([rgb[..., :1], alpha], axis=2))
    if mode == "P":
        return Image.fromarray(rgb).quantize(64)
    if mode == "I;16":  # values to 1000: PIL's convert("RGB") clips the upper part to 255
        return Image.fromarray((rgb[..., 0].astype(np.uint16) * 4))
    if mode == "CMYK":
        return Image.fromarray(rgb).convert("CMYK")
    raise ValueError(mode)


def write(tmp_path, image: Image.Image, fmt: str, name: str = "img", **save) -> str:
    path = str(tmp_path / f"{name}.{fmt.lower()}")
    image.save(path, format=fmt, **save)
    return path


def processor(size: int = 336, exif: bool = False) -> ImageProcessor:
    cfg = ModelConfig.preset("paper" if size == 336 else "tiny")
    cfg.image_size = size
    cfg.apply_exif_orientation = exif
    return ImageProcessor(cfg)


def ours(path, proc: ImageProcessor) -> torch.Tensor:
    with Image.open(path) as im:  # as the loaders do: open, load, process
        im.load()
        return proc(im)


# ------------------------------------------------------------------ parity
SIZES = [(336, 336), (501, 333), (200, 517), (120, 90)]  # square, wide, tall, smaller than S
MODES = [("RGB", "PNG"), ("RGB", "JPEG"), ("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"),
         ("L", "PNG"), ("L", "JPEG"), ("I;16", "PNG"), ("CMYK", "JPEG")]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode,fmt", MODES, ids=lambda v: v.replace(";", ""))
def test_tensor_equals_expand2square_plus_clip_processor(tmp_path, mode, fmt, size):
    path = write(tmp_path, make_image(mode, size), fmt)
    got = ours(path, processor(336))
    want = reference_pixels(path, 336)
    assert got.shape == want.shape == (3, 336, 336) and got.dtype == torch.float32
    diff = (got - want).abs().max().item()
    assert diff <= TOLERANCE, f"{mode} {fmt} {size}: max |ours - reference| = {diff:.3g}"


@pytest.mark.parametrize("size", [(56, 56), (75, 41), (13, 56)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_parity_at_the_tiny_size(tmp_path, size):
    path = write(tmp_path, make_image("RGB", size, seed=3), "PNG")
    diff = (ours(path, processor(56)) - reference_pixels(path, 56)).abs().max().item()
    assert diff <= TOLERANCE


def test_pad_colour_is_the_reference_truncation():
    proc = processor()
    assert proc.fill == (122, 116, 104)  # int(m * 255), not round(): (123, 117, 104)
    square = np.asarray(proc.pad_to_square(Image.new("RGB", (30, 10), (255, 0, 0))))
    assert square.shape == (30, 30, 3)
    assert tuple(square[0, 0]) == (122, 116, 104) and tuple(square[29, 29]) == (122, 116, 104)
    assert tuple(square[10, 0]) == (255, 0, 0) and tuple(square[19, 29]) == (255, 0, 0)
    assert tuple(square[9, 0]) == (122, 116, 104) and tuple(square[20, 0]) == (122, 116, 104)


def test_odd_padding_puts_the_extra_row_below(tmp_path):
    # side - h odd: expand2square's (side - h) // 2 puts the image one row high.
    img = Image.new("RGB", (7, 4), (0, 255, 0))
    square = np.asarray(processor().pad_to_square(img))
    green = np.all(square == (0, 255, 0), axis=2).any(axis=1)
    assert green.tolist() == [False, True, True, True, True, False, False]


def test_alpha_is_dropped_not_composited(tmp_path):
    # A fully transparent red pixel stays red (PIL convert drops alpha), as in the reference.
    rgba = Image.new("RGBA", (40, 40), (200, 10, 10, 0))
    got = ours(write(tmp_path, rgba, "PNG", "rgba"), processor(56))
    want = processor(56)(Image.new("RGB", (40, 40), (200, 10, 10)))
    assert torch.equal(got, want)


def test_16_bit_grey_is_clipped_like_pil_convert(tmp_path):
    # The reference's convert("RGB") clips 16-bit values above 255 to white.
    img = Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16))
    got = ours(write(tmp_path, img, "PNG", "grey16"), processor(56))
    white = processor(56)(Image.new("RGB", (20, 20), (255, 255, 255)))
    assert torch.equal(got, white)


# ------------------------------------------------------------------ EXIF orientation
def exif_rotated_jpeg(tmp_path) -> tuple[str, Image.Image]:
    """A 501x333 JPEG whose Orientation tag (6) says: rotate 90 degrees clockwise to display."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path = write(tmp_path, make_image("RGB", (501, 333), seed=7), "JPEG", "exif",
                 exif=exif.tobytes(), quality=95)
    with Image.open(path) as im:
        stored = im.convert("RGB")  # decoded pixels, as stored (not rotated)
    return path, stored


def test_exif_orientation_is_ignored_by_default_as_in_the_reference(tmp_path):
    path, stored = exif_rotated_jpeg(tmp_path)
    assert ModelConfig().apply_exif_orientation is False
    assert ModelConfig.preset("paper").apply_exif_orientation is False
    got = ours(path, processor())
    assert (got - reference_pixels(path, 336)).abs().max().item() <= TOLERANCE
    assert torch.equal(got, processor()(stored))


def test_exif_orientation_switch_shows_the_image_upright(tmp_path):
    path, stored = exif_rotated_jpeg(tmp_path)
    # Orientation 6 displays the stored pixels turned 90 degrees clockwise (= PIL ROTATE_270).
    upright = stored.transpose(Image.Transpose.ROTATE_270)
    assert upright.size == (333, 501)
    got = ours(path, processor(exif=True))
    assert torch.equal(got, processor()(upright))
    assert (got - ours(path, processor())).abs().max() > 0.5  # a different image entirely


def test_exif_switch_is_validated_and_round_trips():
    cfg = ModelConfig.from_dict({"apply_exif_orientation": True}, base=ModelConfig.preset("tiny"))
    assert cfg.apply_exif_orientation is True
    assert ModelConfig.from_dict(cfg.to_dict()).apply_exif_orientation is True
    with pytest.raises(ConfigError, match="model.apply_exif_orientation"):
        ModelConfig.from_dict({"apply_exif_orientation": "false"}, base=ModelConfig.preset("tiny"))


# ------------------------------------------------------------------ interface
def test_shape_dtype_and_normalisation():
    px = processor(56)(Image.new("RGB", (80, 40), (255, 0, 0)))
    assert px.shape == (3, 56, 56) and px.dtype == torch.float32
    red = (np.array([1.0, 0.0, 0.0]) - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(px[:, 28, 28].numpy(), red, atol=1e-5)
    # the padded band is the (truncated) mean colour: within one level of 0 after normalising
    assert px[:, 0, 28].abs().max() < 1 / (255 * min(CLIP_STD)) and px[:, 55, 28].abs().max() < 0.02


def test_batch_stacks():
    proc = processor(56)
    out = proc.batch([Image.new("RGB", (30, 50)), Image.new("L", (56, 56))])
    assert out.shape == (2, 3, 56, 56)


def test_rejects_non_images():
    with pytest.raises(TypeError, match="expects a PIL image"):
        processor(56)(np.zeros((4, 4, 3)))


# ------------------------------------------------------------------ hostile sizes
def _canvas_then_resize(proc: ImageProcessor, image: Image.Image) -> np.ndarray:
    """What `__call__` did before: the whole padded square, then one resize."""
    square = proc.pad_to_square(image)
    return np.array(square if square.size == (proc.size,) * 2 else
                    square.resize((proc.size, proc.size), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("size", [(56, 20), (20, 56), (300, 17), (17, 300), (57, 56), (56, 57), (1, 3), (3, 1),
                                  (200, 199), (41, 90), (90, 41), (56, 56), (130, 130), (5, 5)])
def test_resizing_before_padding_gives_the_canvas_pixels_exactly(size):
    proc = ImageProcessor(ModelConfig.preset("tiny"))  # 56 px: both up- and down-scaling above
    proc.band_bytes = 600  # a few padded rows per band, so tall images take many bands
    image = Image.fromarray(np.random.RandomState(size[0] * 977 + size[1]).randint(0, 256, size[::-1] + (3,),
                                                                                   dtype=np.uint8))
    assert np.array_equal(np.array(proc.pad_and_resize(image)), _canvas_then_resize(proc, image))


def test_image_limits_are_checked_before_anything_is_allocated():
    from modeling.image_processing import ImageLimits, ImageSizeError, check_image_size

    limits = ImageLimits(max_side=1000, max_aspect_ratio=4)
    check_image_size(1000, 250, limits)  # both bounds are inclusive
    with pytest.raises(ImageSizeError, match=r"1001x10 image: longest side 1001 > max_side=1000"):
        check_image_size(1001, 10, limits)
    with pytest.raises(ImageSizeError, match=r"10x41 image: aspect ratio 4.1:1 > max_aspect_ratio=4"):
        check_image_size(10, 41, limits)
    with pytest.raises(ValueError, match=r"image_limits.max_aspect_ratio: must be >= 1"):
        ImageProcessor(ModelConfig.preset("tiny"), ImageLimits(max_aspect_ratio=0.5))
    # The processor refuses a decoded image outside its limits (a caller that skips open_image).
    with pytest.raises(ImageSizeError, match="aspect ratio"):
        ImageProcessor(ModelConfig.preset("tiny"))(Image.new("L", (2100, 100)))


def test_open_image_refuses_a_million_pixel_wide_png_before_decoding_it():
    import io

    from modeling.image_processing import ImageLimits, ImageSizeError, open_image

    buf = io.BytesIO()
    Image.new("L", (1_000_000, 1)).save(buf, format="PNG", optimize=True)
    assert len(buf.getvalue()) < 4096  # the whole attack is about 1 KB
    with pytest.raises(ImageSizeError, match=r"1000000x1 image: longest side 1000000 > max_side=16384"):
        open_image(buf.getvalue(), ImageLimits())
    im = open_image(buf.getvalue(), ImageLimits(max_side=10**6, max_aspect_ratio=10**6))
    assert im.size == (1_000_000, 1) and im.im is not None  # decoded when the limits allow it
