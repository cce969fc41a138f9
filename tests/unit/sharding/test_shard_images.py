"""Image validation: every bad-input case is rejected with its reason, every
unusual-but-valid form passes with the header PIL reads."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the helper importable
from _shard_fixtures import image_bytes  # noqa: E402
from sharding.images import BadImage, inspect_image, read_image_bytes  # noqa: E402


def _exif_rotated_jpeg() -> bytes:
    im = Image.open(io.BytesIO(image_bytes("JPEG", size=(20, 10))))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW on display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def _png16() -> bytes:
    im = Image.new("I;16", (9, 7))
    im.putdata([i * 900 for i in range(63)])
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


VALID = {
    "png_rgb": lambda: image_bytes("PNG"),
    "png_rgba": lambda: image_bytes("PNG", mode="RGBA"),
    "png_palette": lambda: image_bytes("PNG", mode="P"),
    "png_gray": lambda: image_bytes("PNG", mode="L"),
    "png_gray_alpha": lambda: image_bytes("PNG", mode="LA"),
    "png_1bit": lambda: image_bytes("PNG", mode="1"),
    "png_16bit": _png16,
    "png_interlaced": lambda: image_bytes("PNG", interlace=1),
    "jpeg_rgb": lambda: image_bytes("JPEG"),
    "jpeg_cmyk": lambda: image_bytes("JPEG", mode="CMYK"),
    "jpeg_gray": lambda: image_bytes("JPEG", mode="L"),
    "jpeg_progressive": lambda: image_bytes("JPEG", size=(40, 30), progressive=True),
    "jpeg_restart_markers": lambda: image_bytes("JPEG", size=(64, 64), restart_marker_blocks=1),
    "jpeg_exif_orientation": _exif_rotated_jpeg,
    "webp": lambda: image_bytes("WEBP"),
    "webp_lossless_rgba": lambda: image_bytes("WEBP", mode="RGBA", lossless=True),
    "gif": lambda: image_bytes("GIF", mode="P"),
    "bmp": lambda: image_bytes("BMP"),
    "tiff_cmyk": lambda: image_bytes("TIFF", mode="CMYK"),
}


@pytest.mark.parametrize("level", ["structure", "decode", "header"])
@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_forms_pass_with_pil_header(name, level):
    data = VALID[name]()
    before = bytes(data)
    info = inspect_image(data, max_pixels=10_000, level=level)
    with Image.open(io.BytesIO(data)) as im:
        assert (info.width, info.height, info.format) == (im.size[0], im.size[1], im.format)
    assert data == before


def test_exif_orientation_size_is_as_stored():
    info = inspect_image(_exif_rotated_jpeg())
    assert (info.width, info.height) == (20, 10)


def _reason(data: bytes, **kw) -> str:
    with pytest.raises(BadImage) as exc:
        inspect_image(data, **kw)
    return exc.value.reason


def test_zero_byte_and_not_an_image():
    assert _reason(b"") == "zero_byte"
    assert _reason(b"hello, this is text not an image\n" * 3) == "not_an_image"
    assert _reason(b"<html><body>404</body></html>") == "not_an_image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95, -1, -2])
def test_truncated_png_and_jpeg(fmt, keep):
    data = image_bytes(fmt, size=(48, 40))
    cut = data[:int(len(data) * keep)] if keep > 0 else data[:keep]
    assert _reason(cut) in ("truncated", "corrupt")
    if keep > 0.5 or keep < 0:  # header intact: the structure walk must say truncated
        assert _reason(cut) == "truncated"


def test_truncated_webp_is_rejected():
    data = image_bytes("WEBP", size=(48, 40))
    assert _reason(data[: len(data) // 2]) in ("truncated", "corrupt")


def test_corrupt_png_byte_flip_fails_crc():
    data = bytearray(image_bytes("PNG", size=(32, 32)))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF
    assert _reason(bytes(data)) == "corrupt"


def test_corrupt_png_header_fields():
    data = bytearray(image_bytes("PNG"))
    data[24] = 7  # IHDR bit depth 7 does not exist (the CRC is broken too)
    assert _reason(bytes(data)) == "corrupt"


def test_corrupt_jpeg_structure():
    data = bytearray(image_bytes("JPEG", size=(32, 32)))
    data[4:6] = b"\x00\x01"  # first segment length 1: impossible
    assert _reason(bytes(data)) == "corrupt"
    data = bytearray(image_bytes("JPEG", size=(32, 32)))
    sof = data.index(b"\xff\xc0")
    data[sof + 9] = 9  # 9 colour components
    assert _reason(bytes(data)) == "corrupt"


def test_decode_level_catches_truncated_jpeg_scan():
    data = image_bytes("JPEG", size=(64, 64))
    assert _reason(data[: len(data) * 2 // 3], level="decode") == "truncated"


def test_too_many_pixels():
    data = image_bytes("PNG", size=(30, 20))
    assert _reason(data, max_pixels=599) == "too_many_pixels"
    assert inspect_image(data, max_pixels=600).width == 30
    assert _reason(image_bytes("WEBP", size=(30, 20)), max_pixels=100) == "too_many_pixels"


def test_read_image_bytes_missing(tmp_path):
    with pytest.raises(BadImage) as exc:
        read_image_bytes(str(tmp_path / "nope.png"))
    assert exc.value.reason == "missing"
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(BadImage) as exc:
        read_image_bytes(str(tmp_path / "dir.png"))
    assert exc.value.reason == "missing"


@pytest.mark.parametrize("fmt,level", [("PNG", "structure"), ("JPEG", "structure"), ("WEBP", "structure"),
                                       ("PNG", "decode")])
def test_longest_side_and_aspect_ratio_are_bounded(fmt, level):
    def enc(size):
        buf = io.BytesIO()
        Image.new("RGB", size, (9, 9, 9)).save(buf, format=fmt)
        return buf.getvalue()

    assert inspect_image(enc((400, 20)), level=level, max_side=400, max_aspect_ratio=20).width == 400
    with pytest.raises(BadImage) as exc:
        inspect_image(enc((401, 200)), level=level, max_side=400, max_aspect_ratio=20)
    assert exc.value.reason == "side_too_long" and "longest side 401 > 400" in exc.value.detail
    with pytest.raises(BadImage) as exc:
        inspect_image(enc((20, 401)), level=level, max_side=1000, max_aspect_ratio=20)
    assert exc.value.reason == "aspect_ratio" and "20.05:1 > 20:1" in exc.value.detail


def test_the_sharders_default_bounds_are_the_loaders():
    from modeling.image_processing import ImageLimits
    from sharding.shard_mmfr import build_parser
    from sharding.shard_set import ShardOptions

    args = build_parser().parse_args(["SRC", "OUT"])
    assert (args.max_side, args.max_aspect_ratio) == (ShardOptions.max_side, ShardOptions.max_aspect_ratio)
    assert (ShardOptions.max_side, ShardOptions.max_aspect_ratio) == (ImageLimits.max_side,
                                                                     ImageLimits.max_aspect_ratio)
