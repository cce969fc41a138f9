"""Cheap, byte-preserving validation of image files for the sharder.

The shard stores image bytes exactly as read (compression traces are forensic
evidence), so this module never re-encodes anything: it only decides whether a
byte string is a usable image and reads its header (size, format).

Cost matters because the sharder must stay within a small factor of `tar -cf`:
a full decode of every image would dominate the run. Instead:

* PNG: the chunk structure is walked and every chunk's CRC-32 is checked. Every
  byte after the signature is covered by a length field or a CRC, so this
  detects truncation and any corruption of the stored bytes without inflating
  the pixel data.
* JPEG: the marker structure is walked (segment lengths, scans, restart
  markers) up to the end-of-image marker. This detects truncation and broken
  structure; a bit flip inside entropy-coded data is undetectable without a
  decode (libjpeg itself only warns), which `level="decode"` does.
* Both walks read width and height from the header themselves (IHDR, SOFn),
  so PNG and JPEG never go through PIL at all.
* Other formats (WebP, GIF, BMP, TIFF) are rare in MMFR: PIL reads the header
  and fully decodes them. PIL is imported only then (it is a visible share of
  the CLI's start-up), and the plugin matching the file's magic bytes is
  imported first, so that PIL does not load all of its ~50 plugins to open a
  WebP (an unrecognised file still goes through every plugin, as before).

Every problem is raised as `BadImage(reason, detail)` with a reason from
`REASONS`, so that rejections can be counted per reason.
"""
from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from dataclasses import dataclass

# Reasons an image can be rejected, documented once.
REASONS: dict[str, str] = {
    "missing": "the file does not exist (or is not a regular file)",
    "zero_byte": "the file is empty",
    "unreadable": "the file could not be read (permissions, I/O error)",
    "not_an_image": "the bytes are not in any supported image format",
    "truncated": "the image data ends before the format says it should",
    "corrupt": "the image structure or checksums are broken",
    "too_many_pixels": "width x height is above --max-pixels",
    "side_too_long": "the longest side is above --max-side",
    "aspect_ratio": "the longer side over the shorter is above --max-aspect-ratio",
    "unsupported_extension": "the file extension is not an image extension",
}

# Size bounds by default: the same values as the loaders' modeling.image_processing.ImageLimits
# (a test keeps them equal; this package imports nothing from the project). A 1 KB PNG can
# declare 1,000,000 x 1 pixels: few pixels, but padding it to a square would not be.
DEFAULT_MAX_SIDE = 16384
DEFAULT_MAX_ASPECT_RATIO = 20.0

# Validation levels: "structure" is the default described in the module doc;
# "header" only parses the header (fastest, misses truncation); "decode" fully
# decodes every image (slowest, catches corrupt entropy-coded JPEG data).
LEVELS: tuple[str, ...] = ("header", "structure", "decode")

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_CHUNK = struct.Struct(">I4s")


class BadImage(Exception):
    """An image that cannot go into a shard; `reason` is a key of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    """What the shard metadata records about a valid image."""

    width: int  # pixel width as stored (before any EXIF rotation)
    height: int  # pixel height as stored
    format: str  # PIL's format name: "PNG", "JPEG", "WEBP", ...


# Valid PNG (colour type -> bit depths), from the PNG specification.
_PNG_DEPTHS = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}


def _check_png(data: bytes) -> ImageInfo:
    """Walk PNG chunks, verify CRCs and IHDR; raises BadImage on truncation/corruption."""
    pos, n = len(_PNG_SIG), len(data)
    crc32 = zlib.crc32
    view = memoryview(data)
    info = None
    has_idat = False
    while True:
        if pos + 8 > n:
            raise BadImage("truncated", f"PNG ends inside a chunk header at byte {pos} of {n}")
        length, ctype = _PNG_CHUNK.unpack_from(data, pos)
        if length > 0x7FFFFFFF:
            raise BadImage("corrupt", f"PNG chunk length {length} at byte {pos} is invalid")
        end = pos + 8 + length
        if end + 4 > n:
            raise BadImage("truncated", f"PNG chunk {ctype!r} at byte {pos} needs {end + 4 - n} more bytes")
        if crc32(view[pos + 4:end]) != int.from_bytes(data[end:end + 4], "big"):
            raise BadImage("corrupt", f"PNG chunk {ctype!r} at byte {pos} fails its CRC check")
        if info is None:
            if ctype != b"IHDR" or length != 13:
                raise BadImage("corrupt", "PNG does not start with a valid IHDR chunk")
            width, height, depth, color, comp, filt, lace = struct.unpack_from(">IIBBBBB", data, pos + 8)
            if depth not in _PNG_DEPTHS.get(color, ()) or comp or filt or lace > 1:
                raise BadImage("corrupt", f"PNG IHDR has invalid depth {depth} / colour type {color}")
            info = ImageInfo(width, height, "PNG")
        has_idat = has_idat or ctype == b"IDAT"
        pos = end + 4
        if ctype == b"IEND":
            if not has_idat:
                raise BadImage("corrupt", "PNG has no image data (IDAT) chunk")
            return info


# Markers without a length field: SOI, EOI, TEM, RST0-7.
_JPEG_STANDALONE = {0xD8, 0xD9, 0x01} | set(range(0xD0, 0xD8))


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# In entropy-coded data, 0xFF is followed by 0x00 (stuffing), a restart marker
# or more 0xFF fill; anything else is the next marker.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _check_jpeg(data: bytes) -> ImageInfo:
    """Walk JPEG markers to EOI; raises BadImage on truncation/broken structure."""
    n = len(data)
    pos = 2  # after SOI, which the caller has checked
    info = None
    while True:
        if pos + 2 > n:
            raise BadImage("truncated", f"JPEG ends at byte {n} without an end-of-image marker")
        if data[pos] != 0xFF:
            raise BadImage("corrupt", f"JPEG expected a marker at byte {pos}, found 0x{data[pos]:02x}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill bytes may precede a marker
            pos += 1
            continue
        if marker == 0xD9:
            if info is None:
                raise BadImage("corrupt", "JPEG has no frame header")
            return info
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if pos + 4 > n:
            raise BadImage("truncated", f"JPEG ends inside marker 0x{marker:02x} at byte {pos}")
        seg_len = (data[pos + 2] << 8) | data[pos + 3]
        if seg_len < 2:
            raise BadImage("corrupt", f"JPEG marker 0x{marker:02x} at byte {pos} has length {seg_len}")
        if marker in _SOF and info is None:
            if seg_len < 8 or pos + 10 > n:
                raise BadImage("truncated" if pos + 10 > n else "corrupt", "JPEG frame header is cut short")
            height, width = struct.unpack_from(">HH", data, pos + 5)
            if data[pos + 9] not in (1, 2, 3, 4):
                raise BadImage("corrupt", f"JPEG frame has {data[pos + 9]} components")
            info = ImageInfo(width, height, "JPEG")
        pos += 2 + seg_len
        if pos > n:
            raise BadImage("truncated", f"JPEG segment 0x{marker:02x} runs past the end of the file")
        if marker != 0xDA:
            continue
        if info is None:
            raise BadImage("corrupt", "JPEG scan before any frame header")
        m = _NEXT_MARKER.search(data, pos)
        if m is None:
            raise BadImage("truncated", "JPEG scan data ends without an end-of-image marker")
        pos = m.start()


def _decode(im: Image.Image) -> None:
    try:
        im.load()
    except OSError as exc:
        msg = str(exc)
        reason = "truncated" if "truncat" in msg.lower() else "corrupt"
        raise BadImage(reason, f"decoding failed: {msg}") from None
    except (SyntaxError, ValueError, struct.error, IndexError, EOFError) as exc:
        raise BadImage("corrupt", f"decoding failed: {exc}") from None


def size_problem(width: int, height: int, max_pixels: int | None, max_side: int | None,
                 max_aspect_ratio: float | None) -> BadImage | None:
    """The BadImage a `width` x `height` image gets under the bounds (None: no bound), or None."""
    if max_pixels is not None and width * height > max_pixels:
        return BadImage("too_many_pixels", f"{width}x{height} = {width * height} > {max_pixels}")
    longest, shortest = max(width, height), min(width, height)
    if max_side is not None and longest > max_side:
        return BadImage("side_too_long", f"{width}x{height}: longest side {longest} > {max_side}")
    if max_aspect_ratio is not None and shortest > 0 and longest > max_aspect_ratio * shortest:
        return BadImage("aspect_ratio", f"{width}x{height}: {longest / shortest:.4g}:1 > {max_aspect_ratio:g}:1")
    return None


def inspect_image(data: bytes, max_pixels: int | None = None, level: str = "structure",
                  max_side: int | None = None, max_aspect_ratio: float | None = None) -> ImageInfo:
    """Validate image bytes and return their header info; raise BadImage if unusable.

    `max_pixels` rejects images whose width x height is above it, `max_side`
    those whose longest side is, `max_aspect_ratio` those whose longer side
    over shorter side is (None: no such limit); an image over a bound is never
    decoded. `level` is one of LEVELS. The bytes are never modified.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if not data:
        raise BadImage("zero_byte")
    if level == "structure" and data.startswith(_PNG_SIG):
        info = _check_png(data)  # parses IHDR itself: no PIL needed
    elif level == "structure" and data.startswith(b"\xff\xd8\xff"):
        info = _check_jpeg(data)  # parses the frame header itself
    else:
        info = _inspect_with_pil(data, level, lambda w, h: size_problem(w, h, max_pixels, max_side, max_aspect_ratio))
    if info.width <= 0 or info.height <= 0:
        raise BadImage("corrupt", f"header gives size {info.width}x{info.height}")
    problem = size_problem(info.width, info.height, max_pixels, max_side, max_aspect_ratio)
    if problem is not None:
        raise problem
    return info


# Magic bytes -> the PIL plugin that reads them (formats outside Image.preinit()).
_PLUGIN_BY_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (8, b"WEBP", "WebPImagePlugin"),  # RIFF....WEBP
    (0, b"II*\0", "TiffImagePlugin"),
    (0, b"MM\0*", "TiffImagePlugin"),
)


def _import_pil(data: bytes):
    """PIL.Image, with the plugin for `data`'s format registered (if known)."""
    import importlib

    from PIL import Image
    for offset, magic, plugin in _PLUGIN_BY_MAGIC:
        if data[offset:offset + len(magic)] == magic:
            importlib.import_module(f"PIL.{plugin}")
            break
    return Image


def _inspect_with_pil(data: bytes, level: str, too_big) -> ImageInfo:
    Image = _import_pil(data)
    with warnings.catch_warnings():
        # Our own --max-pixels / --max-side checks replace PIL's decompression-bomb guard.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            try:
                im = Image.open(io.BytesIO(data))
            except Image.UnidentifiedImageError:
                raise BadImage("not_an_image", "no image format recognises the bytes") from None
            except (OSError, SyntaxError, ValueError, struct.error, IndexError, EOFError) as exc:
                # The format was recognised but its header is broken.
                msg = str(exc)
                reason = "truncated" if "truncat" in msg.lower() else "corrupt"
                raise BadImage(reason, f"header unreadable: {msg}") from None
            with im:
                info = ImageInfo(im.size[0], im.size[1], im.format or "UNKNOWN")
                # Never decode what is over a size bound (memory), nor at "header" level.
                if level != "header" and info.width > 0 and info.height > 0 and too_big(*im.size) is None:
                    _decode(im)
        finally:
            Image.MAX_IMAGE_PIXELS = saved_limit
    return info


def read_image_bytes(path: str) -> bytes:
    """Read a file whole; missing/unreadable files raise BadImage."""
    try:
        # Unbuffered: FileIO.readall sizes its buffer from fstat and reads in
        # C, without the BufferedReader that open(path, "rb") would build.
        with open(path, "rb", buffering=0) as fh:
            return fh.readall()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise BadImage("missing", path) from None
    except OSError as exc:
        raise BadImage("unreadable", f"{path}: {exc}") from None
