"""Images as they are sent to a vision-language model: MIME type, size, optional
downsizing, the data URL, and an estimate of the input tokens they cost.

Only the copy that is sent is ever downsized; the stored image is untouched.
"""
from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

# Formats the OpenAI vision input accepts as they are (and vLLM's loader
# decodes): their bytes are sent unchanged, under the MIME type of their content.
SENDABLE: dict[str, str] = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}

# Limits of Pillow's decoder for images we resize or convert: a decompression
# bomb is refused rather than allocated.
MAX_PIXELS = 200_000_000


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for a request."""

    data: bytes
    """The bytes that are sent (the original file, or a downsized/converted copy)."""
    mime: str
    """MIME type of `data`, from its content (never from the file name)."""
    width: int
    """Width of the stored image."""
    height: int
    """Height of the stored image."""
    sent_width: int
    """Width of what is sent."""
    sent_height: int
    """Height of what is sent."""
    transformed: str
    """"" when the original bytes are sent, else what was done ("downsized", "converted")."""

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


class ImageProblem(ValueError):
    """An image that cannot be sent; the message is the reason."""


def prepare(raw: bytes, max_side: int | None) -> PreparedImage:
    """Identify `raw` by content; downsize (if its longer side exceeds `max_side`)
    or convert (formats the API does not take) into PNG, or JPEG for JPEG input."""
    try:
        with Image.open(io.BytesIO(raw)) as im:
            fmt, (w, h) = im.format, im.size
            n_frames = getattr(im, "n_frames", 1)
            too_big = max_side is not None and max(w, h) > max_side
            if fmt in SENDABLE and not too_big and not (fmt == "GIF" and n_frames > 1):
                # Sent as they are, so never decoded here: verify() walks the file's structure
                # (PNG chunk CRCs) without decompressing it, to catch damaged files before the API does.
                im.verify()
                return PreparedImage(raw, SENDABLE[fmt], w, h, w, h, "")
            if w * h > MAX_PIXELS:
                raise ImageProblem(f"{w}x{h} pixels is more than {MAX_PIXELS} to decode")
            im.seek(0)
            im.load()
            out = im.convert("RGB") if im.mode not in ("RGB", "RGBA", "L", "LA") else im.copy()
    except ImageProblem:
        raise
    except UnidentifiedImageError:
        raise ImageProblem("not a readable image: Pillow identifies no image format in it") from None
    except Exception as exc:  # Pillow raises many types for bad data
        raise ImageProblem(f"not a readable image: {type(exc).__name__}: {exc}") from None
    if too_big:
        scale = max_side / max(w, h)
        out = out.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if fmt == "JPEG":
        out.convert("RGB").save(buf, "JPEG", quality=95)
        mime = "image/jpeg"
    else:
        out.save(buf, "PNG")
        mime = "image/png"
    return PreparedImage(buf.getvalue(), mime, w, h, out.width, out.height, "downsized" if too_big else "converted")


def image_tokens(width: int, height: int, detail: str) -> int:
    """Input tokens an image costs, by the tile rule OpenAI documents for GPT-4o:
    85 at detail "low"; otherwise the image is fitted into 2048x2048, its
    shorter side scaled to 768, and each 512-px tile costs 170 on top of 85.
    ("auto" is counted as "high", the upper bound.) Other models count
    differently; this is an estimate for planning, not a bill."""
    if detail == "low":
        return 85
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        s = 2048 / max(w, h)
        w, h = w * s, h * s
    if min(w, h) > 768:
        s = 768 / min(w, h)
        w, h = w * s, h * s
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)
