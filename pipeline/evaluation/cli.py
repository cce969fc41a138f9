"""Evaluate a FakeReasoning checkpoint on MMFR's evaluation generators and benchmarks.

The same command as `fakereasoning-eval`, `python -m pipeline.evaluation` and (from a
checkout) `launch/eval.py`; under the launcher `deepspeed --module pipeline.evaluation ...`.

    deepspeed --num_gpus 8 launch/eval.py --checkpoint runs/x/export --shards OUT_DIR/eval --out runs/x/eval
    deepspeed --num_gpus 8 launch/eval.py --checkpoint DIR --shards OUT_DIR/eval \\
        --benchmark genimage=BENCH/genimage --benchmark chameleon=BENCH/chameleon --out RESULTS_DIR
    python launch/eval.py --checkpoint DIR --shards OUT_DIR/eval --out RESULTS_DIR      (one process)
    deepspeed --num_gpus 8 launch/eval.py --protocol reference --checkpoint DIR --shards OUT_DIR/eval --out R
    python launch/eval.py --checkpoint DIR --benchmark celeb-df=BENCH/celeb-df --benchmark ffpp=BENCH/ffpp \
        --calibrate-on ffpp --perturb jpeg:95,75,50 --perturb resize:0.5 --perturb blur:1.0 --out R

Video sets are also scored per video (mean frame p(fake)); every set gets ECE /
NLL / Brier and a reliability diagram; --calibrate-on picks a p(fake) threshold
on one set and reports the others at it; --perturb adds a robustness sweep.

Protocols: "ours" (default) prompts with Vicuna v1 as in training, decodes
greedily and parses with word boundaries and a negation check. "reference"
does what the reference's forgery_eval/eval.py does: llava_v1 prompt, sampling
at temperature 0.2 (no top-p, 1 beam, 512 new tokens, seeded per batch), the
substring parser that drops answers without <REASONING>, only images listed in
<gen>_reasoning.json, CSS of an empty hypothesis from CLIP's embedding of "".
The reference script scores 10 real + 10 fake per generator by default
(--max-per-class 10); its paper numbers use every image (the default here).

Each image is scored by exactly one rank; rank 0 writes RESULTS_DIR/results.json,
results.md, predictions.jsonl and plots, and logs to W&B. Every finished batch
is also written to RESULTS_DIR/partial/, so a killed run started again with the
same arguments (any number of ranks) resumes where it stopped (--restart: start
over; other settings or another checkpoint: exit status 2). Benchmarks are sharded
with `bash launch/shard_benchmark.sh NAME SRC OUT`. This file only parses
arguments; pipeline/evaluation/runner.py does the work.
"""
from __future__ import annotations

import argparse
import os
import sys


def _benchmark(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--benchmark expects NAME=SHARDS, got {text!r}")
    return name, path


def _perturb(text: str) -> str:
    from pipeline.evaluation.perturbations import PerturbationError, parse_perturbation

    try:
        parse_perturbation(text)
    except PerturbationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None  # argparse names the flag
    return text


def parse_args(argv=None):
    from modeling.image_processing import ImageLimits  # the defaults of EvalConfig's size bounds

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="model folder: this project's export (export_merged) or training checkpoint, or the "
                        "reference's released FakeReasoning format (config.json model_type llava_llama)")
    p.add_argument("--shards", help="MMFR evaluation shards (the sharder's OUT_DIR/eval)")
    p.add_argument("--set-name", default="mmfr", help="name of the --shards set in reports (default mmfr)")
    p.add_argument("--benchmark", action="append", type=_benchmark, default=[], metavar="NAME=SHARDS",
                   help="a benchmark's shard folder (from launch/shard_benchmark.sh); repeatable")
    p.add_argument("--out", required=True, help="results folder")
    g = p.add_argument_group("protocol and selection")
    g.add_argument("--protocol", choices=("ours", "reference"), default="ours",
                   help="evaluation protocol (default ours; see above)")
    g.add_argument("--max-per-class", type=int,
                   help="per generator, the first N real and N fake images in <gen>_reasoning.json order "
                        "(balanced subset; the reference script's default is 10; default: every image)")
    g.add_argument("--limit", type=int,
                   help="score only the first N (selected) images of each set in shard order (smoke test; "
                        "not balanced: use --max-per-class for that)")
    g = p.add_argument_group("generation (defaults: the protocol's)")
    g.add_argument("--batch-size", type=int, default=8, help="images per batch on each rank (default 8)")
    g.add_argument("--max-new-tokens", type=int, help="answer length limit (default 512)")
    g.add_argument("--temperature", type=float,
                   help="0 = greedy, > 0 samples (default: ours 0, reference 0.2)")
    g.add_argument("--top-p", type=float, help="nucleus sampling threshold (default: none)")
    g.add_argument("--conversation", choices=("vicuna_v1", "llava_v1"),
                   help="prompt conversation (default: ours vicuna_v1, reference llava_v1)")
    g.add_argument("--seed", type=int, default=0,
                   help="sampling seed; each batch is seeded from it and its first image (default 0)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="override the checkpoint's dtype (e.g. bfloat16 on GPU)")
    g.add_argument("--num-workers", type=int, default=2, help="image decoding processes per rank (default 2)")
    g.add_argument("--max-image-side", type=int, default=ImageLimits.max_side,
                   help=f"an image with a longer side is a failure record, never decoded (default {ImageLimits.max_side})")
    g.add_argument("--max-image-aspect-ratio", type=float, default=ImageLimits.max_aspect_ratio,
                   help="likewise for longer side / shorter side (default "
                        f"{ImageLimits.max_aspect_ratio:g}; a 1 KB PNG can declare 1000000x1 pixels)")
    g.add_argument("--reference-base-model",
                   help="for a reference LoRA training output: the model folder it was trained from")
    g = p.add_argument_group("metrics and outputs")
    g.add_argument("--css-model", help="local CLIP folder (text model + tokenizer) for CSS; without it CSS is n/a")
    g.add_argument("--css-batch-size", type=int, default=64, help="texts per CLIP batch (default 64)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--perturb", action="append", type=_perturb, default=[], metavar="KIND:S1[,S2...]",
                   help="robustness sweep, repeatable: also score every image under jpeg:QUALITY (1..100), "
                        "resize:FACTOR (down-scaling, (0, 1]) or blur:RADIUS, e.g. --perturb jpeg:95,75,50 "
                        "--perturb resize:0.5 --perturb blur:1.0; images are decoded once for the whole sweep; "
                        "results.md gets one table per kind, clean run first")
    g.add_argument("--calibrate-on", metavar="SET",
                   help="choose the p(fake) threshold maximising accuracy on this set (a --benchmark name or "
                        "the --set-name) and report every set's CPM accuracy at it")
    g.add_argument("--face-crop", action="store_true",
                   help="crop video frames to their largest face (OpenCV Haar cascade; needs the 'face' extra, "
                        "opencv-python-headless<5)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--restart", action="store_true",
                   help="discard the partial output of an earlier (killed or different) run in OUT/partial and "
                        "score everything again; without it a rerun with the same arguments resumes where it "
                        "stopped, and one with other settings or another checkpoint stops with exit status 2")
    g = p.add_argument_group("Weights & Biases (rank 0)")
    g.add_argument("--wandb-mode", choices=("auto", "online", "offline", "disabled"), default="auto",
                   help="auto: online with credentials, else offline (default)")
    g.add_argument("--wandb-project", default="fakereasoning", help="W&B project")
    g.add_argument("--wandb-name", help="W&B run name")
    g.add_argument("--wandb-dir", help="folder receiving wandb/ (default: --out)")
    g.add_argument("--wandb-samples", type=int, default=32, help="predictions with images sent to W&B (default 32)")
    p.add_argument("--check", action="store_true",
                   help="validate the settings and every input path (checkpoint, shards, CSS model), "
                        "print the config, exit")
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway.
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.tracking import WandbConfig
    from pipeline.cli_config import checked_config
    from pipeline.evaluation.config import EvalConfig

    names = [n for n, _ in args.benchmark]
    if len(names) != len(set(names)):
        print("error: --benchmark names must be unique", file=sys.stderr)
        return 2
    cfg = EvalConfig(
        checkpoint=args.checkpoint, out=args.out, shards=args.shards, set_name=args.set_name,
        benchmarks=dict(args.benchmark), protocol=args.protocol, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        conversation=args.conversation, seed=args.seed, css_model=args.css_model,
        css_batch_size=args.css_batch_size, num_workers=args.num_workers, limit=args.limit,
        max_per_class=args.max_per_class, dtype=args.dtype,
        reference_base_model=args.reference_base_model, plots=not args.no_plots,
        wandb=WandbConfig(project=args.wandb_project, mode=args.wandb_mode, name=args.wandb_name,
                          dir=args.wandb_dir, tags=["eval"]),
        wandb_samples=args.wandb_samples, progress=not args.no_progress, perturb=list(args.perturb),
        calibrate_on=args.calibrate_on, face_crop=args.face_crop, restart=args.restart,
        max_image_side=args.max_image_side, max_image_aspect_ratio=args.max_image_aspect_ratio)
    cfg = checked_config(cfg.validate, args.check)  # types, values and every input path
    if isinstance(cfg, int):
        return cfg
    from pipeline.evaluation.resume import ResumeMismatch
    from pipeline.evaluation.runner import run_eval
    from sharding.dir_lock import OutputLocked

    completed = False
    try:
        results = run_eval(cfg)
        completed = True
    except (ResumeMismatch, OutputLocked) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        from pipeline.distributed import shutdown

        shutdown(completed)  # an orderly end of the process group (see shutdown's doc)
    if results is not None:
        with open(os.path.join(cfg.out, "results.md"), encoding="utf-8") as f:
            print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
