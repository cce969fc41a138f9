"""Known cross-dataset benchmarks: which adapter reads each and the layout it expects.

`python -m sharding.eval_sets --list` prints this table. Any other dataset
can be sharded with an adapter name (`folder`, `manifest`, `parquet`, `video`)
in place of a benchmark name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ADAPTERS: tuple[str, ...] = ("folder", "manifest", "parquet", "video")


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark."""

    name: str  # registry name, also the `source` of its samples and the set name in reports
    adapter: str  # one of ADAPTERS
    layout: str  # the folder layout SRC must have (documentation, shown by --list)
    options: dict[str, Any] = field(default_factory=dict)  # adapter keyword defaults


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark(
        "genimage", "folder",
        "SRC/<generator>/val/{ai,nature}/<image>, e.g. imagenet_ai_0419_sdv4/val/ai/x.png; "
        "the train/ folders are skipped; one report row per generator folder",
        {"generator_level": True, "skip_dirs": ("train",)}),
    Benchmark(
        "chameleon", "folder",
        "SRC/{0_real,1_fake}/<image> (the released test/ folder, or its parent); one report row",
        {"generator_level": False}),
    Benchmark(
        "universalfakedetect", "folder",
        "SRC/<generator>/[<category>/]{0_real,1_fake}/<image> (the CNNSpot test set: progan/airplane/0_real, "
        "biggan/1_fake, ...; UniversalFakeDetect's diffusion_datasets: guided/1_fake, laion/0_real, ...); "
        "one report row per generator folder",
        {"generator_level": True}),
    Benchmark(
        "community-forensics-eval", "parquet",
        "SRC = a .parquet file or a folder of them (the hub export's data/*.parquet) with columns "
        "image_data (encoded bytes) and label (1 fake, 0 real); one report row unless "
        "--generator-column (e.g. model_name or architecture) is given",
        {"image_column": "image_data", "label_column": "label"}),
    Benchmark(
        "celeb-df", "video",
        "SRC/{Celeb-real,YouTube-real,Celeb-synthesis}/<video>.mp4 [+ SRC/List_of_testing_videos.txt, "
        "used when present to keep the official test videos]; frames at --fps (default 1), at most "
        "--max-frames (default 16) per video; one report row",
        {"generator": "benchmark", "auto_list": "List_of_testing_videos.txt"}),
    Benchmark(
        "ffpp", "video",
        "SRC/original_sequences/youtube/c23/videos/<video>.mp4 and "
        "SRC/manipulated_sequences/<method>/c23/videos/<video>.mp4 (FaceForensics++; --include selects "
        "another compression, e.g. '*/c40/videos/*'); one report row per method plus 'youtube' (reals)",
        {"generator": "after_label", "include": ("*/c23/videos/*",)}),
)}
