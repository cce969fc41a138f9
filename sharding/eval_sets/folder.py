"""`folder` adapter: labels from folder names, optional generator folders above.

Layouts it reads (names compared case-insensitively):

    SRC/[<generator>/[<anything>/...]]{0_real,1_fake | real,fake | nature,ai}/.../<image>

- The label is given by the deepest path component that is a label folder
  (common.LABEL_FOLDERS); an image under none is rejected (`no_label_folder`).
- The generator is the first path component below SRC when the label folder
  is not directly under SRC (GenImage's `<generator>/val/ai`, CNNSpot's
  `progan/airplane/1_fake`), else the benchmark name. `generator_level=False`
  always uses the benchmark name (Chameleon: one set).
- `skip_dirs` prunes folders by name anywhere in the tree (GenImage's `train`).
- Files whose extension is not an image extension are listed as `file`
  rejections (README.txt, .DS_Store) and do not count as images.

Image bytes are stored unchanged, under their own extension.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from .. import schema
from .common import LABEL_FOLDERS, BenchmarkScan, ext_of, walk_files


def scan_folder(src: str, benchmark: str, generator_level: bool = True,
                skip_dirs: Sequence[str] = ()) -> BenchmarkScan:
    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: not a directory (the folder adapter needs the benchmark's root folder)")
    skip = {d.lower() for d in skip_dirs}
    scan = BenchmarkScan(benchmark)
    files = [f for f in walk_files(src) if not any(p.lower() in skip for p in f.split("/")[:-1])]
    for rel in files:
        parts = rel.split("/")
        label_at = next((i for i in range(len(parts) - 2, -1, -1) if parts[i].lower() in LABEL_FOLDERS), None)
        # An unlabelled image is still reported under its generator folder.
        under_gen = len(parts) > 1 and (label_at is None or label_at > 0)
        generator = parts[0] if generator_level and under_gen else benchmark
        if ext_of(rel) not in schema.IMAGE_EXTENSIONS:
            scan.reject(generator, rel, "unsupported_extension",
                        f"extension {ext_of(rel)!r} is not an image extension", kind="file")
            continue
        if label_at is None:
            scan.reject(generator, rel, "no_label_folder",
                        f"no folder named one of {sorted(LABEL_FOLDERS)} above the image")
            continue
        full = os.path.join(src, *parts)
        st = os.stat(full)
        if st.st_size == 0:
            scan.reject(generator, rel, "zero_byte", "the file is empty")
            continue
        scan.add(rel, generator, LABEL_FOLDERS[parts[label_at].lower()], path=full, size=st.st_size,
                 fingerprint=f"{st.st_size}:{st.st_mtime_ns}")
    return scan
