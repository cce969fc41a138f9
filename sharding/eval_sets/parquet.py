"""`parquet` adapter: image bytes and labels in parquet files (hub exports).

SRC is one parquet file or a folder searched recursively for `*.parquet`
(sorted). Columns:

- the image column (`image_column`, default: the first of `image`,
  `image_data`, `img`, `bytes` present) holds the encoded bytes, either as
  binary or as the Hugging Face `Image` struct `{bytes, path}`;
- `label_column` (default `label`): 0/1 or real/fake;
- `generator_column` (optional): the group to report under, else the
  benchmark name.

Bytes are stored unchanged; the member extension comes from the bytes' magic
number (a file name column could disagree with the content). A row's relpath
is `<parquet file relative to SRC>/<row index, 8 digits>.<ext>`. Rows are read
in batches and staged to files (see common), so memory stays bounded.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from .common import STAGING_DIR, BenchmarkScan, stage_bytes
from .listing import parse_label

IMAGE_COLUMNS: tuple[str, ...] = ("image", "image_data", "img", "bytes")


def sniff_ext(data: bytes) -> str | None:
    """Image member extension from the magic number, None if not an image format we store."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data.startswith(b"BM"):
        return "bmp"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "tif"
    return None


def _files(src: str) -> tuple[str, list[str]]:
    if os.path.isfile(src):
        return os.path.dirname(src), [os.path.basename(src)]
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: no such parquet file or folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for n in sorted(filenames):
            if n.endswith(".parquet"):
                found.append(os.path.relpath(os.path.join(dirpath, n), src).replace(os.sep, "/"))
    if not found:
        raise FileNotFoundError(f"{src}: no *.parquet file found")
    return src, found


def scan_parquet(src: str, benchmark: str, out_dir: str, image_column: str | None = None,
                 label_column: str = "label", generator_column: str | None = None,
                 batch_size: int = 256) -> BenchmarkScan:
    import pyarrow.parquet as pq

    src = os.path.abspath(src)
    base, files = _files(src)
    scan = BenchmarkScan(benchmark, staged=os.path.join(out_dir, STAGING_DIR))
    for rel_file in files:
        full = os.path.join(base, rel_file)
        pf = pq.ParquetFile(full)
        names = pf.schema_arrow.names
        img_col = image_column or next((c for c in IMAGE_COLUMNS if c in names), None)
        missing = [c for c in (img_col, label_column, generator_column) if c is not None and c not in names]
        if img_col is None or missing:
            raise ValueError(f"{full}: missing column(s) {missing or ['one of ' + '/'.join(IMAGE_COLUMNS)]}; "
                             f"columns are {names}")
        columns: Sequence[str] = [c for c in (img_col, label_column, generator_column) if c]
        st = os.stat(full)
        row = 0
        for batch in pf.iter_batches(batch_size=batch_size, columns=list(dict.fromkeys(columns))):
            data = batch.to_pydict()
            for i in range(batch.num_rows):
                value = data[img_col][i]
                if isinstance(value, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
                    value = value.get("bytes")
                generator = str(data[generator_column][i]) if generator_column else benchmark
                label = parse_label(data[label_column][i])
                where = f"{rel_file}/{row:08d}"
                ext = sniff_ext(value) if isinstance(value, (bytes, bytearray)) else None
                if label is None:
                    scan.reject(generator, where, "bad_label", f"label {data[label_column][i]!r} is not 0/1/real/fake")
                elif not value:
                    scan.reject(generator, where, "zero_byte", f"column {img_col!r} holds no bytes")
                elif ext is None:
                    scan.reject(generator, where, "not_an_image", "the bytes are not PNG/JPEG/WebP/GIF/BMP/TIFF")
                else:
                    rel = f"{where}.{ext}"
                    path = stage_bytes(out_dir, rel, bytes(value))
                    scan.add(rel, generator, label, path=path, size=len(value),
                             fingerprint=f"{st.st_size}:{st.st_mtime_ns}:{row}")
                row += 1
    return scan
