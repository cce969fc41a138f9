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
- `group_labels`: more label folder names (case-insensitive), which are also
  a report group of their own when directly below SRC (B-Free's `RAISE` reals
  next to its generator folders); `default_label`: the label of an image
  under a generator folder with no label folder above it (B-Free: every
  generator folder is fake). Without it such an image is rejected.
- Files whose extension is not an image extension are listed as `file`
  rejections (README.txt, .DS_Store) and do not count as images.

Image bytes are stored unchanged, under their own extension.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from .. import schema
from .common import LABEL_FOLDERS, BenchmarkScan, ext_of, walk_files


def is_image(scan: BenchmarkScan, rel: str, generator: str) -> bool:
    """Whether `rel` has an image extension; if not, it is recorded as a `file` rejection (README, .DS_Store)."""
    if ext_of(rel) in schema.IMAGE_EXTENSIONS:
        return True
    scan.reject(generator, rel, "unsupported_extension", f"extension {ext_of(rel)!r} is not an image extension",
                kind="file")
    return False


def add_image_file(scan: BenchmarkScan, full: str, rel: str, generator: str, label: int) -> bool:
    """Add the image file `full` as a sample, or record why not (missing, zero_byte); returns whether added.

    Shared by the adapters whose images are files on disk.
    """
    if not os.path.isfile(full):
        scan.reject(generator, rel, "missing", f"{full} does not exist")
        return False
    st = os.stat(full)
    if st.st_size == 0:
        scan.reject(generator, rel, "zero_byte", "the file is empty")
        return False
    scan.add(rel, generator, label, path=full, size=st.st_size, fingerprint=f"{st.st_size}:{st.st_mtime_ns}")
    return True


def scan_folder(src: str, benchmark: str, generator_level: bool = True, skip_dirs: Sequence[str] = (),
                group_labels: Mapping[str, int] | None = None, default_label: int | None = None) -> BenchmarkScan:
    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: not a directory (the folder adapter needs the benchmark's root folder)")
    skip = {d.lower() for d in skip_dirs}
    groups = {k.lower(): int(v) for k, v in (group_labels or {}).items()}
    labels = {**LABEL_FOLDERS, **groups}
    scan = BenchmarkScan(benchmark)
    files = [f for f in walk_files(src) if not any(p.lower() in skip for p in f.split("/")[:-1])]
    for rel in files:
        parts = rel.split("/")
        label_at = next((i for i in range(len(parts) - 2, -1, -1) if parts[i].lower() in labels), None)
        # An unlabelled image is still reported under its generator folder; a
        # group label folder (B-Free's RAISE) is its own report group.
        under_gen = len(parts) > 1 and (label_at is None or label_at > 0 or parts[0].lower() in groups)
        generator = parts[0] if generator_level and under_gen else benchmark
        if not is_image(scan, rel, generator):
            continue
        if label_at is not None:
            label = labels[parts[label_at].lower()]
        elif default_label is not None and len(parts) > 1:
            label = default_label
        else:
            scan.reject(generator, rel, "no_label_folder", f"no folder named one of {sorted(labels)} above the image")
            continue
        add_image_file(scan, os.path.join(src, *parts), rel, generator, label)
    return scan
