"""Ask a FakeReasoning checkpoint about your own images and videos: real or fake, and why.

    fakereasoning-predict --checkpoint runs/x/export/merged photo.jpg
    fakereasoning-predict --checkpoint DIR ~/inbox/ 'scans/**/*.png' --out preds.jsonl
    find /data -name '*.webp' | fakereasoning-predict --checkpoint DIR - --format csv --out preds.csv
    fakereasoning-predict --checkpoint DIR clip.mp4 --evidence maps/
    deepspeed --num_gpus 8 --module pipeline.inference --checkpoint DIR /data/crawl --out preds.jsonl

Inputs: files, folders (recursive; image and video extensions), glob patterns
(quote them; ** recurses), --list FILE (one path per line), and - for paths on
standard input. Every image format the sharder takes (PNG, JPEG, WebP, BMP,
GIF, TIFF) and videos (mp4, avi, mov, mkv, webm, m4v: frames sampled at
--video-fps, at most --video-max-frames, as the video benchmarks are; a video
gets each frame's result and the mean frame p(fake), the evaluation's rule).

Per input: the verdict (fake when p(fake) >= --threshold), p(fake) from the
classification probability mapper, the answer and its four sections (SUMMARY,
CAPTION, REASONING, CONCLUSION), the parse status, and `disagree` when the
written conclusion and p(fake) point different ways. --format text (default on a
terminal; jsonl when piped) / jsonl / csv; --out FILE (its extension picks the format).

The protocol and generation flags are fakereasoning-eval's: an image gets the
same answer and p(fake) here as in the evaluation under the same settings
(--protocol reference reproduces the reference's inference and evaluation
prompts and sampling).

--detect-only skips the reasoning: one forward with "<CONCLUSION> This image is"
forced right after the prompt gives p(fake). The model was trained to reason
before concluding, so this is out of distribution: on the demo's evaluation
set (benchmarks/bench_predict.py, tiny demo model) it measured
DETECT_ONLY_FIGURES. Use it to screen, and the full mode for what you report.

--evidence DIR writes, per image, the DINOv2 attention the fusion module
consumed as a heat map over the image (PNG; padding hatched) and the raw grid
(.npy, sums to 1), and lists the top grid cells in the record
(docs/architecture.md, "Evidence maps").

With --out, a rerun skips inputs already predicted with the same checkpoint and
settings (keyed by content sha256); a killed run loses at most the batch in flight.
Several ranks (deepspeed / torchrun) each score a disjoint share; rank 0 writes.
Exit status: 0 when at least one input was scored, 1 when none could be, 2 for
a usage or configuration error. Bad inputs (missing, unreadable, truncated, not
an image, too large) are named on stderr, counted, and get an error record.
"""
from __future__ import annotations

import argparse
import os
import sys

# From benchmarks/results/bench_predict.md (copied when the benchmark is rerun);
# README's table has the same figures.
DETECT_ONLY_FIGURES = ("AUC 0.807 against 0.796 for the full mode (it ranks images as well), but "
                       "p(fake) squeezed into 0.03-0.06, so at threshold 0.5 it called every image real "
                       "(accuracy 0.500 against 0.725), 10.5x faster")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="fakereasoning-predict",
                                description=__doc__.replace("DETECT_ONLY_FIGURES", DETECT_ONLY_FIGURES),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image/video files, folders, globs, or - (stdin)")
    p.add_argument("--checkpoint", required=True,
                   help="model folder: this project's export or training checkpoint, or the reference's release")
    p.add_argument("--list", dest="list_file", metavar="FILE", help="a text file of input paths, one per line")
    p.add_argument("--out", help="output file (default: standard output); a rerun with the same file resumes")
    p.add_argument("--format", choices=("text", "jsonl", "csv"),
                   help="output format (default: text on stdout; from --out's extension: .csv, .txt, else jsonl)")
    p.add_argument("--threshold", type=float, default=0.5, help="verdict fake when p(fake) >= this (default 0.5)")
    p.add_argument("--detect-only", action="store_true",
                   help="no reasoning: p(fake) from one forward with the conclusion forced (fast screening; "
                        "out of the training distribution, see above)")
    p.add_argument("--evidence", metavar="DIR", help="write attention heat maps (PNG) and grids (.npy) here")
    p.add_argument("--evidence-top", type=int, default=5, help="top grid cells listed per image (default 5)")
    g = p.add_argument_group("protocol and generation (as in fakereasoning-eval)")
    g.add_argument("--protocol", choices=("ours", "reference"), default="ours",
                   help="ours: Vicuna v1 prompt, greedy; reference: llava_v1, sampling at 0.2 (default ours)")
    g.add_argument("--batch-size", type=int, default=8, help="images per forward on each rank (default 8)")
    g.add_argument("--max-new-tokens", type=int, help="answer length limit (default 512)")
    g.add_argument("--temperature", type=float, help="0 = greedy, > 0 samples (default: the protocol's)")
    g.add_argument("--top-p", type=float, help="nucleus sampling threshold (default: none)")
    g.add_argument("--conversation", choices=("vicuna_v1", "llava_v1"), help="prompt conversation")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="override the checkpoint's dtype")
    g.add_argument("--quantize", choices=("8bit", "4bit"),
                   help="load the LLM's linear layers in 8 or 4 bits (bitsandbytes, the 'quantize' extra): "
                        "a 13B model on one 24 GB GPU")
    g.add_argument("--reference-base-model", help="for a reference LoRA training output: its base model folder")
    g = p.add_argument_group("inputs")
    g.add_argument("--num-workers", type=int, default=2, help="decoding processes per rank (default 2)")
    g.add_argument("--video-fps", type=float, default=1.0, help="video frames sampled per second (default 1)")
    g.add_argument("--video-max-frames", type=int, default=16, help="frames per video at most (default 16)")
    g.add_argument("--max-pixels", type=int, default=89_478_485,
                   help="refuse images with more pixels, before decoding (default PIL's 89478485)")
    g.add_argument("--max-file-bytes", type=int, default=1 << 30, help="refuse larger files (default 1 GiB)")
    g.add_argument("--max-image-side", type=int, default=16384,
                   help="refuse images with a longer side, before decoding (default 16384)")
    g.add_argument("--max-image-aspect-ratio", type=float, default=20.0,
                   help="refuse images with a larger long/short side ratio, before decoding (default 20)")
    p.add_argument("--restart", action="store_true", help="ignore what --out already holds and predict everything")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--check", action="store_true", help="validate the settings and paths, print them, exit")
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway.
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.cli_config import checked_config
    from pipeline.inference.config import PredictConfig

    fmt = args.format
    if fmt is None and args.out is None and not sys.stdout.isatty():
        fmt = "jsonl"  # piped into another program: one JSON object per line
    cfg = PredictConfig(
        checkpoint=args.checkpoint, inputs=list(args.inputs), list_file=args.list_file, out=args.out,
        format=fmt, threshold=args.threshold, protocol=args.protocol, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        conversation=args.conversation, seed=args.seed, dtype=args.dtype, num_workers=args.num_workers,
        reference_base_model=args.reference_base_model, detect_only=args.detect_only, evidence=args.evidence,
        evidence_top=args.evidence_top, quantize=args.quantize, video_fps=args.video_fps,
        video_max_frames=args.video_max_frames, max_pixels=args.max_pixels, max_file_bytes=args.max_file_bytes,
        max_image_side=args.max_image_side, max_image_aspect_ratio=args.max_image_aspect_ratio,
        progress=not args.no_progress, restart=args.restart)
    cfg = checked_config(cfg.validate, args.check)
    if isinstance(cfg, int):
        return cfg
    from pipeline.inference.output import RecordWriter
    from pipeline.inference.run import PredictUsageError, run_predict

    writer = RecordWriter(sys.stdout, cfg.output_format()) if cfg.out is None else None

    def emit(rec):
        writer.write(rec)
        sys.stdout.flush()

    try:
        summary = run_predict(cfg, emit=emit)
    except PredictUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # every rank holds the reduced summary; one prints it
        print(summary.line(), file=sys.stderr)
        if cfg.out is not None:
            print(f"predict: wrote {cfg.out}", file=sys.stderr)
    return 0 if summary.scored or summary.already_done else 1


if __name__ == "__main__":
    sys.exit(main())
