"""Known cross-dataset benchmarks: which adapter reads each and the layout it expects.

`python -m sharding.eval_sets --list` prints this table. Any other dataset
can be sharded with an adapter name (`folder`, `manifest`, `parquet`, `video`,
`loki`) in place of a benchmark name. A benchmark may have named presets
(`--preset`, e.g. FF++'s compression levels): option sets that replace some
of its default options.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ADAPTERS: tuple[str, ...] = ("folder", "manifest", "parquet", "video", "loki")


@dataclass(frozen=True)
class Preset:
    """A named variant of a benchmark's options (`--preset NAME`)."""

    doc: str  # what the variant is (shown by --list)
    options: dict[str, Any]  # adapter options that replace the benchmark's defaults


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark."""

    name: str  # registry name, also the `source` of its samples and the set name in reports
    adapter: str  # one of ADAPTERS
    layout: str  # the folder layout SRC must have (documentation, shown by --list)
    options: dict[str, Any] = field(default_factory=dict)  # adapter keyword defaults
    presets: dict[str, Preset] = field(default_factory=dict)  # --preset NAME -> options over `options`
    default_preset: str | None = None  # the preset `options` already are (documentation)
    reference: str = ""  # where the layout was read (repository and files), shown by --list
    redistributable: bool = True  # its terms allow showing its images elsewhere: the evaluation uploads
    # prediction thumbnails of a set to W&B only when this is true (off: FaceForensics++'s and Celeb-DF's
    # terms forbid redistributing their frames)

    def resolved_options(self, preset: str | None) -> dict[str, Any]:
        """The adapter options under `preset` (None: the defaults)."""
        if preset is None:
            return dict(self.options)
        if preset not in self.presets:
            known = ", ".join(self.presets) or "none"
            raise ValueError(f"benchmark {self.name!r} has no preset {preset!r} (presets: {known})")
        return {**self.options, **self.presets[preset].options}


def _ffpp_level(folder: str, *more: str) -> dict[str, Any]:
    return {"include": tuple(f"*/{f}/videos/*" for f in (folder, *more))}


# B-Free's real folder next to its generator folders (RAISE-1k, as in
# Synthbuster); the exact spelling in the download could not be confirmed.
_BFREE_REAL_FOLDERS = {"raise": 0, "raise-1k": 0, "raise_1k": 0, "raise1k": 0}


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
        {"generator": "benchmark", "auto_list": "List_of_testing_videos.txt"}, redistributable=False),
    Benchmark(
        "ffpp", "video",
        "SRC/original_sequences/youtube/<c>/videos/<target>.mp4 and "
        "SRC/manipulated_sequences/<method>/<c>/videos/<target>_<source>.mp4 (FaceForensics++) "
        "[+ SRC/splits/test.json or SRC/test.json, the official split: a JSON list of [a, b] id pairs, "
        "keeping originals a, b and manipulations a_b, b_a (140 + 140 per method); used when present]; "
        "<c> by --preset (default c23); frames as celeb-df; one report row per method plus 'youtube' (reals)",
        {"generator": "after_label", "auto_pairs": ("splits/test.json", "test.json"), **_ffpp_level("c23")},
        presets={"c23": Preset("HQ: H.264 CRF 23", _ffpp_level("c23")),
                 "c40": Preset("LQ: H.264 CRF 40, the paper's 'FF++ LQ'", _ffpp_level("c40")),
                 "raw": Preset("lossless (CRF 0; folder c0 or raw)", _ffpp_level("c0", "raw"))},
        default_preset="c23",
        reference="ondyari/FaceForensics: dataset/README.md, dataset/splits/test.json", redistributable=False),
    Benchmark(
        "loki", "loki",
        "SRC = the LOKI root: SRC/data_json/image/true_or_false.json [+ multi_choice.json] (from the GitHub "
        "repository) and SRC/media_data/image/<uuid>.<ext> (the Hugging Face archive media_data.zip, unzipped "
        "there); judgement items give each image's label (question_type image_tf_image_<real|fake>_ask_..._<sub>); "
        "one report row per subcategory (animals, doc, medicine, object, person, satellite, sence)",
        reference="opendatalab/LOKI: README.md, data_json/image/true_or_false.json, multi_choice.json, "
                  "lm_evaluate/tasks/loki.py"),
    Benchmark(
        "bfree", "folder",
        "SRC/<generator>/<image> with the reals in SRC/RAISE/ (B-Free's extended Synthbuster: RAISE-1k reals "
        "resized to about 1024x1024 pixels of area, FLUX and SD 3.5 fakes from RAISE captions, beside which "
        "Synthbuster's own generator folders may be put); every folder but RAISE (or --real-dir) is fake, "
        "0_real/1_fake folders inside one, if any, decide; one report row per folder",
        {"generator_level": True, "group_labels": _BFREE_REAL_FOLDERS, "default_label": 1},
        reference="grip-unina/B-Free: README.md 'Dataset of new generators' (folder names of the download "
                  "not confirmed there)"),
    Benchmark(
        "bfree-viral", "manifest",
        "SRC = the download root holding BFree_viral_images.csv (or the csv itself): columns filename "
        "(REAL|FAKE/<source_id>/img<n>.<ext>, relative to the csv), label (REAL/FAKE) and md5; rows whose "
        "file is absent (dead links) or has another md5 are skipped and counted; one report row",
        {"path_column": "filename", "md5_column": "md5", "listing_name": "BFree_viral_images.csv"},
        reference="grip-unina/B-Free: viral_images_dataset/README.md, BFree_viral_images.csv, download.ipynb"),
)}
