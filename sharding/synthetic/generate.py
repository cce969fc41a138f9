"""Writing a synthetic MMFR tree in exactly the released layout (docs/architecture.md, section 3).

Determinism: each image's pixels, name and texts come from random generators
seeded by (seed, stream, index), where the stream is a stable hash of the
image's split/source/label; nothing depends on the order in which images are
made, on the number of workers or on the clock. JSON files are written with
sorted keys, encoders with fixed options, so the same arguments give the same
bytes.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import shutil
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sharding.schema import GENERATORS
from sharding.synthetic.annotations import build_attributes, build_records, scene_context
from sharding.synthetic.styles import EVAL_STYLES, FORMAT_EXTENSIONS, TRAIN_STYLES
from sharding.synthetic.traces import render_image
from sharding.worker_pool import start_pool

# Entries of the output directory this generator owns (and --overwrite removes).
MANAGED_ENTRIES: tuple[str, ...] = ("diffusiondb", "laion", "evaluation_sets", "forgery_reasoning_cot.json")
COT_FILE = "forgery_reasoning_cot.json"


@dataclass(frozen=True)
class SyntheticConfig:
    """Arguments of one synthetic MMFR run."""

    out: Path
    """Dataset root to write (created if missing)."""
    train_images: int
    """Training images: ceil(N/2) DiffusionDB fakes and floor(N/2) LAION reals."""
    eval_images_per_generator: int
    """Images per evaluation generator, half real and half fake (must be even)."""
    seed: int = 0
    """Seed of everything random; same seed and arguments give identical bytes."""
    image_size: int = 64
    """Base side in pixels (multiple of 8, >= 32); sizes vary by -0/+25% around it."""
    images_per_folder: int = 0
    """Images per diffusiondb part / laion folder; 0 = auto (4 folders up to 1000 each)."""
    multi_record_fraction: float = 0.3
    """Fraction of training images with 2-3 CoT records instead of one."""
    null_fraction: float = 0.3
    """Probability that an attribute is null in an annotation (at least one never is)."""
    workers: int = 1
    """Processes rendering images; 1 renders in this process."""
    overwrite: bool = False
    """Remove the managed entries of an existing dataset in `out` first."""
    progress: bool = True
    """Show a tqdm progress bar on stderr."""

    def validate(self) -> None:
        """Raise ValueError naming the field and the reason for a bad value."""
        if self.train_images < 2:
            raise ValueError(f"train_images must be >= 2 (one fake, one real), got {self.train_images}")
        m = self.eval_images_per_generator
        if m < 0 or m % 2:
            raise ValueError(
                f"eval_images_per_generator must be an even number >= 0 so that real and fake "
                f"counts are equal per generator, got {m}"
            )
        if self.image_size < 32 or self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 and >= 32, got {self.image_size}")
        if not 0 <= self.images_per_folder <= 10000:
            raise ValueError(
                f"images_per_folder must be in [0, 10000] (LAION names are 5-digit folder + 4-digit index), "
                f"got {self.images_per_folder}"
            )
        for name in ("multi_record_fraction", "null_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")


@dataclass(frozen=True)
class ImageJob:
    """One image to render, fully determined by its fields and the run's seed."""

    relpath: str
    """Path relative to the dataset root."""
    split: str
    """"train" or "eval"."""
    source: str
    """"diffusiondb", "laion", or the evaluation generator."""
    label: int
    """0 real, 1 fake."""
    stream: int
    """Stable hash of split/source/label; with the index it seeds the image."""
    index: int
    """Index of the image within its stream."""


@dataclass
class SyntheticSummary:
    """What a run wrote."""

    out: Path
    train_fake: int
    train_real: int
    eval_per_generator: dict[str, dict[str, int]]
    """generator -> {"real": n, "fake": n}."""
    records: int
    """LLaVA records in forgery_reasoning_cot.json."""
    images_with_several_records: int
    bytes_written: int
    formats: dict[str, int] = field(default_factory=dict)
    """Image count per "<split>/<real|fake>/<format>"."""
    seconds: float = 0.0

    @property
    def images(self) -> int:
        return self.train_fake + self.train_real + sum(sum(v.values()) for v in self.eval_per_generator.values())

    def format(self) -> str:
        """Human-readable summary for the end of a run."""
        lines = [
            f"synthetic MMFR written to {self.out}",
            f"  training : {self.train_fake} fakes (diffusiondb), {self.train_real} reals (laion)",
            f"  CoT      : {self.records} records, {self.images_with_several_records} images with >1 record",
        ]
        for gen, counts in self.eval_per_generator.items():
            lines.append(f"  eval {gen:<16}: {counts['real']} real, {counts['fake']} fake")
        lines.append("  formats  : " + ", ".join(f"{k}={v}" for k, v in sorted(self.formats.items())))
        lines.append(
            f"  total    : {self.images} images, {self.bytes_written / 1e6:.2f} MB of images "
            f"in {self.seconds:.1f}s ({self.images / max(self.seconds, 1e-9):.0f} images/s)"
        )
        return "\n".join(lines)


def _stream(split: str, source: str, label: int) -> int:
    return zlib.crc32(f"{split}/{source}/{label}".encode())


def _seed_sequence(seed: int, job: ImageJob) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, job.stream, job.index])


def _per_folder(n: int, config: SyntheticConfig) -> int:
    if config.images_per_folder:
        return config.images_per_folder
    # Several folders even for tiny sets (so readers meet more than one), at
    # most 1000 images per folder for big ones.
    return max(1, min(1000, math.ceil(n / 4)))


def plan_jobs(config: SyntheticConfig) -> list[ImageJob]:
    """Every image of the dataset, in a fixed order: train fakes, train reals, eval."""
    jobs: list[ImageJob] = []
    n_fake = (config.train_images + 1) // 2
    n_real = config.train_images // 2

    stream = _stream("train", "diffusiondb", 1)
    per = _per_folder(n_fake, config)
    names: set[str] = set()
    for i in range(n_fake):
        # A UUID4-shaped name from its own generator, like DiffusionDB's files.
        raw = np.random.default_rng([config.seed, stream, i, 1]).bytes(16)
        name = str(uuid.UUID(bytes=raw, version=4))
        if name in names:  # 2**-122 odds, but a silent overwrite would lose an image
            raise RuntimeError(f"synthetic uuid collision for diffusiondb image {i}; use another seed")
        names.add(name)
        jobs.append(ImageJob(f"diffusiondb/part-{i // per + 1:06d}/{name}.png", "train", "diffusiondb", 1, stream, i))

    stream = _stream("train", "laion", 0)
    per = _per_folder(n_real, config)
    for i in range(n_real):
        folder, within = divmod(i, per)
        jobs.append(ImageJob(f"laion/{folder:05d}/{folder:05d}{within:04d}.jpg", "train", "laion", 0, stream, i))

    half = config.eval_images_per_generator // 2
    for gen in GENERATORS:
        style = EVAL_STYLES[gen]
        for label, folder, prefix, fmt in ((0, "0_real", "real", style.real_format), (1, "1_fake", gen, style.fake_format)):
            stream = _stream("eval", gen, label)
            ext = FORMAT_EXTENSIONS[fmt]
            for i in range(half):
                jobs.append(ImageJob(f"evaluation_sets/{gen}/{folder}/{prefix}_{i:05d}.{ext}", "eval", gen, label, stream, i))
    return jobs


@dataclass
class _JobResult:
    relpath: str
    attributes: dict
    records: list
    n_bytes: int
    fmt: str


def _run_job(args: tuple[ImageJob, SyntheticConfig]) -> _JobResult:
    job, config = args
    style = TRAIN_STYLES[job.source] if job.split == "train" else EVAL_STYLES[job.source]
    pixel_ss, text_ss = _seed_sequence(config.seed, job).spawn(2)
    data, fmt, facts = render_image(np.random.default_rng(pixel_ss), style, job.label, config.image_size)
    expected = job.relpath.rsplit(".", 1)[1]
    if FORMAT_EXTENSIONS[fmt] != expected:  # the plan and the style disagree: a bug, not bad luck
        raise RuntimeError(f"{job.relpath}: rendered {fmt} but the path says .{expected}")
    path = config.out / job.relpath
    path.write_bytes(data)

    text_rng = np.random.default_rng(text_ss)
    ctx = scene_context(text_rng, facts, style.artifact_phrase)
    attributes = build_attributes(text_rng, ctx, job.label, config.null_fraction)
    records: list = []
    if job.split == "train":
        stem = job.relpath.rsplit("/", 1)[1].rsplit(".", 1)[0]
        records = build_records(text_rng, ctx, attributes, job.label, job.relpath, stem, config.multi_record_fraction)
    return _JobResult(job.relpath, attributes, records, len(data), fmt)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _prepare_out(config: SyntheticConfig, jobs: list[ImageJob]) -> None:
    out = config.out
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    present = [e for e in MANAGED_ENTRIES if (out / e).exists()]
    if present:
        if not config.overwrite:
            raise FileExistsError(
                f"{out}: already holds {', '.join(present)}; pass --overwrite (overwrite=True) to replace them"
            )
        for entry in present:
            target = out / entry
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    for folder in sorted({str(Path(j.relpath).parent) for j in jobs}):
        (out / folder).mkdir(parents=True, exist_ok=True)
    # Generators always get their folders, even with 0 eval images.
    for gen in GENERATORS:
        for folder in ("0_real", "1_fake"):
            (out / "evaluation_sets" / gen / folder).mkdir(parents=True, exist_ok=True)


def generate_mmfr(
    out: str | Path,
    train_images: int,
    eval_images_per_generator: int,
    seed: int = 0,
    *,
    image_size: int = 64,
    images_per_folder: int = 0,
    multi_record_fraction: float = 0.3,
    null_fraction: float = 0.3,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> SyntheticSummary:
    """Write a synthetic MMFR dataset under `out`; see `SyntheticConfig` for the arguments."""
    config = SyntheticConfig(
        out=Path(out), train_images=train_images, eval_images_per_generator=eval_images_per_generator,
        seed=seed, image_size=image_size, images_per_folder=images_per_folder,
        multi_record_fraction=multi_record_fraction, null_fraction=null_fraction,
        workers=workers, overwrite=overwrite, progress=progress,
    )
    return generate_from_config(config)


def generate_from_config(config: SyntheticConfig) -> SyntheticSummary:
    config.validate()
    start = time.perf_counter()
    jobs = plan_jobs(config)
    _prepare_out(config, jobs)

    args = [(job, config) for job in jobs]
    bar = tqdm(total=len(jobs), desc="synthetic MMFR", unit="img", disable=not config.progress)
    results: list[_JobResult] = []
    if config.workers == 1:
        for a in args:
            results.append(_run_job(a))
            bar.update()
    else:
        # forkserver, not fork: callers (tests, the pipeline) may hold threads
        # (torch, tqdm), and forking a threaded process can deadlock. Results
        # come back in job order; no byte written depends on that order.
        ctx = multiprocessing.get_context("forkserver")
        with start_pool(ctx, config.workers) as pool:
            for result in pool.imap(_run_job, args, chunksize=32):
                results.append(result)
                bar.update()
    bar.close()

    train_annotations: dict[str, dict] = {"diffusiondb": {}, "laion": {}}
    eval_annotations: dict[str, dict] = {gen: {} for gen in GENERATORS}
    records: list[dict] = []
    formats: Counter[str] = Counter()
    eval_counts = {gen: {"real": 0, "fake": 0} for gen in GENERATORS}
    several = 0
    for job, result in zip(jobs, results):
        kind = "fake" if job.label else "real"
        formats[f"{job.split}/{kind}/{result.fmt}"] += 1
        if job.split == "train":
            train_annotations[job.source][result.relpath] = result.attributes
            records.extend(result.records)
            several += len(result.records) > 1
        else:
            # Eval keys are relative to evaluation_sets/, e.g. "flux/1_fake/x.png".
            eval_annotations[job.source][result.relpath.split("/", 1)[1]] = result.attributes
            eval_counts[job.source][kind] += 1

    for source, annotations in train_annotations.items():
        _write_json(config.out / source / f"{source}_reasoning.json", annotations)
    for gen, annotations in eval_annotations.items():
        _write_json(config.out / "evaluation_sets" / gen / f"{gen}_reasoning.json", annotations)
    _write_json(config.out / COT_FILE, records)

    return SyntheticSummary(
        out=config.out,
        train_fake=sum(1 for j in jobs if j.split == "train" and j.label),
        train_real=sum(1 for j in jobs if j.split == "train" and not j.label),
        eval_per_generator=eval_counts,
        records=len(records),
        images_with_several_records=several,
        bytes_written=sum(r.n_bytes for r in results),
        formats=dict(formats),
        seconds=time.perf_counter() - start,
    )
