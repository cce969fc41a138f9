"""Streaming shard loader vs a map-style loader built like the reference's.

The reference (a LLaVA fork) json.load()s the whole conversation file on every
rank, opens one loose image file per sample with Image.open, pads it to a
square and runs transformers' CLIP image processor. This benchmark builds that
loader and ours (pipeline/data) over the *same* images in the same run:

  1. writes a synthetic MMFR dataset (sharding.synthetic, images of
     --image-size px) and shards it (sharding.shard_mmfr);
  2. measures, each in a fresh process so that memory readings do not mix,
     samples/s (wall) and samples per CPU-second of the loader worker(s) for
       stream      make_train_loader over the shards
       map-tv      the reference-style Dataset + transformers CLIPImageProcessor
                   (transformers 5's default, torchvision backend)
       map-pil     the same with CLIPImageProcessorPil (PIL/NumPy, the code path
                   the reference ran under transformers 4.x)
     both processors built from the openai/clip-vit-large-patch14-336
     preprocessor config dict (nothing is downloaded);
  3. repeats the memory reading with a dataset of --records annotations (312K,
     as MMFR's training set): a conversation JSON of that many records
     (replicated synthetic records pointing at the same images) for the map
     loader, and a shard set of that many samples for the stream (the real
     shards listed again under symlinked names, so sizes.json totals it);
  4. prints a table and the ratios stream / map.

Tokenisation is the project's template for both loaders, so the comparison is
about reading, decoding and image preprocessing. CPU-seconds are the workers'
user+sys time (getrusage of reaped children), which stays meaningful on a
shared machine where wall time does not.

    .venv/bin/python benchmarks/bench_loader.py            # about 2-4 minutes on 2 cores
    .venv/bin/python benchmarks/bench_loader.py --help
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# preprocessor_config.json of openai/clip-vit-large-patch14-336 (the paper's CLIP tower).
CLIP_336_CONFIG = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}


# --------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of this process and its loader workers, sampled every 50 ms.

    main_rss: resident set of this process. workers_uss: memory private to the
    worker processes (pages they copied or allocated; pages still shared with
    this process after fork are already in main_rss). PSS is not used: on a
    machine shared with other Python processes it moves with their count.
    """

    def __init__(self):
        import psutil

        self._proc = psutil.Process()
        self.main_rss = self.workers_uss = self.total = 0
        self.totals: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        uss = 0
        for p in self._proc.children(recursive=True):
            try:
                uss += p.memory_full_info().uss
            except Exception:  # noqa: BLE001 - a worker may exit between listing and reading
                continue
        rss = self._proc.memory_info().rss
        self.main_rss = max(self.main_rss, rss)
        self.workers_uss = max(self.workers_uss, uss)
        self.total = max(self.total, rss + uss)
        self.totals.append(rss + uss)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- reference-style loader
def reference_loader(json_path, image_root, processor, tokenizer, samples, batch_size, workers, seed):
    """LLaVA's LazySupervisedDataset pattern: whole JSON in memory, one file per sample."""
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset, RandomSampler

    from modeling.template import build_training_example
    from pipeline.data.samples import Example, collate, question_answer
    from sharding.schema import conclusion_label

    fill = tuple(int(x * 255) for x in processor.image_mean)

    def expand2square(img):
        w, h = img.size
        if w == h:
            return img
        side = max(w, h)
        canvas = Image.new(img.mode, (side, side), fill)
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        return canvas

    class ReferenceDataset(Dataset):
        def __init__(self):
            with open(json_path, encoding="utf-8") as f:
                self.records = json.load(f)

        def __len__(self):
            return len(self.records)

        def __getitem__(self, i):
            rec = self.records[i]
            image = Image.open(os.path.join(image_root, rec["image"])).convert("RGB")
            pixels = processor.preprocess(expand2square(image), return_tensors="pt")["pixel_values"][0]
            question, answer = question_answer(rec["conversations"])
            ex = build_training_example(tokenizer, question, answer)
            return Example(rec["id"], rec["image"], pixels, ex.input_ids, ex.labels, ex.image_position,
                           conclusion_label(answer) or 0, 0)

    dataset = ReferenceDataset()
    sampler = RandomSampler(dataset, num_samples=samples, generator=torch.Generator().manual_seed(seed))
    pad = tokenizer.pad_token_id
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=lambda exs: collate(exs, pad), drop_last=True,
                      worker_init_fn=lambda _: torch.set_num_threads(1))


def measure(args) -> dict:
    """Run one loader in this (fresh) process and return its numbers."""
    import torch

    import psutil
    # Every measurement imports the same modules first, so the memory baseline
    # taken below is the same and the difference is the loader's own.
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from modeling.config import ModelConfig
    from modeling.image_processing import ImageProcessor
    from modeling.tokenization.loading import load_tokenizer
    from pipeline.data import DataConfig, make_train_loader

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(os.path.join(args.work_dir, "tokenizer"))
    baseline = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        if args.measure == "stream":
            shard_dir = os.path.join(args.work_dir, "shards", "train" if args.size == "small" else "train-big")
            cfg = DataConfig(train_shards=shard_dir, batch_size=args.batch_size, num_workers=args.workers,
                             shuffle_buffer=args.shuffle_buffer, samples_per_epoch=args.samples,
                             seed=args.seed)
            loader = make_train_loader(cfg, tokenizer, ImageProcessor(ModelConfig.preset("paper")),
                                       rank=0, world_size=1, epoch=0)
        else:
            cls = CLIPImageProcessor if args.measure == "map-tv" else CLIPImageProcessorPil
            name = "cot.json" if args.size == "small" else "cot-big.json"
            loader = reference_loader(os.path.join(args.work_dir, name), os.path.join(args.work_dir, "raw"),
                                      cls(**CLIP_336_CONFIG), tokenizer, args.samples, args.batch_size,
                                      args.workers, args.seed)
        ready = time.perf_counter()
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        n = 0
        first = None
        for batch in loader:
            n += batch["pixel_values"].shape[0]
            if first is None:
                first, n_first = time.perf_counter(), n
        end = time.perf_counter()
        del loader  # workers exit and are reaped: their CPU time lands in RUSAGE_CHILDREN
        time.sleep(0.2)
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if args.workers == 0:
        cpu = time.process_time()
    else:
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "loader": args.measure, "size": args.size, "samples": n, "startup_s": ready - t0,
        "samples_per_s": (n - n_first) / max(end - first, 1e-9),
        "samples_per_cpu_s": n / max(cpu, 1e-9),
        "baseline_mb": baseline / 2**20, "main_rss_mb": mem.main_rss / 2**20,
        "workers_uss_mb": mem.workers_uss / 2**20, "loader_mb": (mem.total - baseline) / 2**20,
        "loader_median_mb": (sorted(mem.totals)[len(mem.totals) // 2] - baseline) / 2**20,
    }


# --------------------------------------------------------------------------- dataset preparation
def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def prepare(args) -> None:
    from modeling.tokenization.tokenizer import build_bpe_tokenizer

    raw, shards = os.path.join(args.work_dir, "raw"), os.path.join(args.work_dir, "shards")
    py = sys.executable
    if not os.path.exists(os.path.join(raw, "forgery_reasoning_cot.json")):
        print(f"writing {args.train_images} synthetic images of ~{args.image_size}px ...", flush=True)
        run([py, "-m", "sharding.synthetic", "--out", raw, "--train-images", str(args.train_images),
             "--eval-images-per-generator", "2", "--image-size", str(args.image_size),
             "--workers", "1", "--quiet", "--seed", str(args.seed)])
    if not os.path.exists(os.path.join(shards, "train", "sizes.json")):
        run([py, "-m", "sharding.shard_mmfr", "--workers", "1", "--no-progress",
             "--max-samples-per-shard", "16", raw, shards])
    with open(os.path.join(raw, "forgery_reasoning_cot.json"), encoding="utf-8") as f:
        records = json.load(f)
    with open(os.path.join(args.work_dir, "cot.json"), "w", encoding="utf-8") as f:
        json.dump(records, f)
    big = os.path.join(args.work_dir, "cot-big.json")
    if not os.path.exists(big):
        print(f"writing a conversation JSON of {args.records} records ...", flush=True)
        with open(big, "w", encoding="utf-8") as f:
            f.write("[")
            for i in range(args.records):
                rec = dict(records[i % len(records)], id=f"{records[i % len(records)]['id']}-{i}")
                f.write(("," if i else "") + json.dumps(rec))
            f.write("]")
    # The same shards listed under more names, so that the stream's dataset has
    # as many samples as the big JSON has records.
    train, train_big = os.path.join(shards, "train"), os.path.join(shards, "train-big")
    with open(os.path.join(train, "sizes.json")) as f:
        sizes = json.load(f)
    copies = math.ceil(args.records / sum(sizes.values()))
    if not os.path.exists(os.path.join(train_big, "sizes.json")):
        os.makedirs(train_big, exist_ok=True)
        big_sizes = {}
        for c in range(copies):
            for name, n in sizes.items():
                alias = f"copy{c:05d}-{name}"
                os.symlink(os.path.join(train, name), os.path.join(train_big, alias))
                big_sizes[alias] = n
        with open(os.path.join(train_big, "sizes.json"), "w") as f:
            json.dump(big_sizes, f)
    if not os.path.exists(os.path.join(args.work_dir, "tokenizer")):
        answers = [r["conversations"][1]["value"] for r in records]
        build_bpe_tokenizer(answers, os.path.join(args.work_dir, "tokenizer"), vocab_size=2000)
    print(f"dataset: {len(records)} records / {sum(sizes.values())} images in {len(sizes)} shards; "
          f"big: {args.records} records ({os.path.getsize(big) / 2**20:.0f} MB JSON) / "
          f"{copies * sum(sizes.values())} samples in {copies * len(sizes)} shards", flush=True)


def table(results: list[dict]) -> str:
    head = (f"{'loader':8} {'dataset':8} {'samples/s':>9} {'samples/cpu-s':>13} {'startup s':>9} "
            f"{'main RSS MB':>11} {'workers USS MB':>14} {'loader MB':>9} {'median':>6}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['loader']:8} {r['size']:8} {r['samples_per_s']:9.1f} {r['samples_per_cpu_s']:13.1f} "
                     f"{r['startup_s']:9.2f} {r['main_rss_mb']:11.0f} {r['workers_uss_mb']:14.0f} "
                     f"{r['loader_mb']:9.0f} {r['loader_median_mb']:6.0f}")
    lines.append("loader MB = peak(main RSS + workers USS) - main RSS after imports "
                 f"({results[0]['baseline_mb']:.0f} MB); median: the same over the run's 50 ms samples "
                 "(the peak includes batches in flight in shared memory)")
    return "\n".join(lines)


def ratios(results: list[dict], records: int) -> str:
    get = {(r["loader"], r["size"]): r for r in results}
    out = []
    for ref in ("map-tv", "map-pil"):
        s, m = get[("stream", "small")], get[(ref, "small")]
        sb, mb = get[("stream", "big")], get[(ref, "big")]
        out.append(f"stream / {ref}: samples per worker CPU-second x{s['samples_per_cpu_s'] / m['samples_per_cpu_s']:.2f}, "
                   f"wall samples/s x{s['samples_per_s'] / m['samples_per_s']:.2f}, "
                   f"loader memory (peak) at {records} records x{sb['loader_mb'] / mb['loader_mb']:.3f}")
    for name in ("stream", "map-tv", "map-pil"):
        small, big = get[(name, "small")], get[(name, "big")]
        out.append(f"{name}: loader memory big - small: peak {big['loader_mb'] - small['loader_mb']:+.0f} MB, "
                   f"median {big['loader_median_mb'] - small['loader_median_mb']:+.0f} MB, "
                   f"startup big / small x{big['startup_s'] / max(small['startup_s'], 1e-9):.1f}")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", help="where the dataset, shards and JSON go (default: a temp dir, removed)")
    p.add_argument("--train-images", type=int, default=128, help="synthetic training images (default 128)")
    p.add_argument("--image-size", type=int, default=512, help="synthetic image side in px (default 512)")
    p.add_argument("--records", type=int, default=312_000, help="annotations of the big dataset (default 312000)")
    p.add_argument("--samples", type=int, default=256, help="samples read per measurement (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--workers", type=int, default=1, help="loader workers (default 1: per-worker numbers)")
    p.add_argument("--shuffle-buffer", type=int, default=64, help="stream shuffle buffer (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--measure", choices=["stream", "map-tv", "map-pil"], help=argparse.SUPPRESS)
    p.add_argument("--size", choices=["small", "big"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return
    tmp = None
    if args.work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_loader_")
        args.work_dir = tmp.name
    os.makedirs(args.work_dir, exist_ok=True)
    try:
        prepare(args)
        results = []
        for size in ("small", "big"):
            for name in ("stream", "map-tv", "map-pil"):
                cmd = [sys.executable, os.path.abspath(__file__), "--measure", name, "--size", size]
                for flag in ("work_dir", "samples", "batch_size", "workers", "shuffle_buffer", "seed"):
                    cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
                out = subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True).stdout
                results.append(json.loads(out.strip().splitlines()[-1]))
                print(f"  measured {name} on {size}", flush=True)
        print(f"\n{args.samples} samples, batch {args.batch_size}, {args.workers} worker(s), images "
              f"~{args.image_size}px -> 336px; small = {args.train_images} images, big = {args.records} "
              f"records/samples\n")
        print(table(results))
        print()
        print(ratios(results, args.records))
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
