"""End-to-end demo on this machine, no network: synthetic MMFR -> shards ->
verify -> `deepspeed` with 2 ranks on CPU (gloo, ZeRO-3, tiny preset) ->
final export -> evaluation on the 10 synthetic generators (launch/eval.py).

    python launch/demo.py --out runs/demo          (what `make demo` runs)

Everything goes under --out:
    mmfr/          the synthetic dataset (MMFR layout)
    shards/        train/ and eval/<generator>/ WebDataset shards
    checkpoints/   DeepSpeed checkpoints (+ zero_to_fp32.py, ds_config.json)
    export/        trainable/ (LoRA adapter + trainables) and merged/ (merged model)
    wandb/         the offline W&B runs of training and evaluation: one project, one group
                   (sync later with `wandb sync`)
    eval/          results.md, results.json, predictions.jsonl, plots (launch/eval.py)
    bench/         a GenImage-layout miniature, its shards and eval/ (JPEG sweep, ECE)
    predict/       fakereasoning-predict on a few demo images: predictions.jsonl, evidence/ heat maps
    train.log, metrics.jsonl

Each step reuses what a previous run left: the dataset and the shards are kept,
and training resumes from the newest complete checkpoint (a finished run only
redoes the export and the evaluation). The first run on a machine also
compiles two DeepSpeed C++ ops (about 2.5 minutes, cached afterwards).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

RECIPE = os.path.join(REPO, "launch", "recipes", "tiny-cpu.yaml")

# The demo's model: the tiny preset at 64 px with 16-px patches (still 4x4 = 16
# image tokens). The synthetic generator traces are 8-px up-sampling tiles: with
# the preset's 56 px / 14-px patches every patch sees the tile at another phase
# (14 mod 8 = 6), so the patch embedding adds a different vector per patch and
# mean-pooled random-tower features barely separate real from fake (linear
# probe 0.65-0.69 on held-out training images); with 16-px patches on 64-px
# images every patch sees the same phase (probe 0.83-0.87, 0.99 with the
# generator's current trace strength). The tests keep the preset's 56 px.
IMAGE_SIZE = 64
MODEL_OVERRIDES = [f"model.image_size={IMAGE_SIZE}", "model.clip.patch_size=16", "model.dino.patch_size=16",
                   f"model.clip.native_image_size={IMAGE_SIZE}", f"model.dino.native_image_size={IMAGE_SIZE}"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--train-images", type=int, default=1200, help="synthetic training images (default 1200)")
    p.add_argument("--eval-images-per-generator", type=int, default=40,
                   help="synthetic evaluation images per generator (default 40)")
    p.add_argument("--epochs", type=float, default=5, help="training epochs (default 5)")
    p.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks (default 2)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra training config overrides")
    return p.parse_args(argv)


def step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.monotonic()


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONPATH": REPO + (os.pathsep + os.environ["PYTHONPATH"]
                                                if os.environ.get("PYTHONPATH") else "")}
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    mmfr, shards = os.path.join(out, "mmfr"), os.path.join(out, "shards")
    os.makedirs(out, exist_ok=True)
    t_all = time.monotonic()

    t = step("1/5 synthetic MMFR")
    if os.path.isfile(os.path.join(mmfr, "forgery_reasoning_cot.json")):
        print(f"reusing {mmfr}")
    else:
        # The base size is the demo model's input size (IMAGE_SIZE): square images
        # reach the towers without a resampling that would smear the 8-px traces.
        run([sys.executable, "-m", "sharding.synthetic", "--out", mmfr, "--train-images", str(args.train_images),
             "--eval-images-per-generator", str(args.eval_images_per_generator),
             "--image-size", str(IMAGE_SIZE), "--seed", str(args.seed)])
    print(f"({time.monotonic() - t:.0f}s)")

    t = step("2/5 shards")
    # The sharder resumes: completed shards are kept, so a rerun is quick.
    run([sys.executable, "-m", "sharding.shard_mmfr", mmfr, shards, "--max-samples-per-shard", "200",
         "--plan-ranks", str(args.ranks), "--plan-workers", "1"])
    print(f"({time.monotonic() - t:.0f}s)")

    t = step("3/5 verify shards")
    run([sys.executable, "-m", "sharding.verify", shards])
    print(f"({time.monotonic() - t:.0f}s)")

    t = step(f"4/5 train: deepspeed, {args.ranks} ranks on CPU (gloo), ZeRO-3, tiny preset")
    from launch.local_run import build_cpu_ops, run_training

    print("DeepSpeed CPU ops: compiling on the first run (about 2.5 minutes), cached afterwards", flush=True)
    print(f"  ready ({build_cpu_ops():.0f}s)", flush=True)

    # The tiny LLM is random-init: LoRA on a frozen random LLM has no language to
    # adapt (LM loss 6.9 -> 6.4 in 225 steps), so the demo trains the whole tiny
    # LLM (6.2 -> 0.5). The paper recipe, and the tests, keep LoRA.
    overrides = [f"output_dir={out}", f"data.train_shards={os.path.join(shards, 'train')}",
                 f"loop.epochs={args.epochs}", "checkpoint.resume=auto", "wandb.mode=offline",
                 "model.lora.enabled=false", "optim.lr=3e-3", "optim.projector_lr=3e-3", *MODEL_OVERRIDES,
                 *args.overrides]
    run_training(RECIPE, overrides, os.path.join(out, "train.log"), num_ranks=args.ranks, echo=True)
    train_s = time.monotonic() - t
    summary = json.load(open(os.path.join(out, "train_summary.json"), encoding="utf-8"))
    run_info = json.load(open(os.path.join(out, "run_info.json"), encoding="utf-8"))
    print(f"({train_s:.0f}s)")

    t = step("5/5 evaluate the exported model on the 10 synthetic generators (launch/eval.py)")
    from launch.tiny_models import build_tiny_clip_text

    # CSS needs a CLIP text model from a local path; the demo has no download,
    # so it builds a random tiny one: the CSS column runs but means nothing here.
    clip_text = build_tiny_clip_text(os.path.join(out, "clip_text"))
    # The evaluation logs to the project training used (the recipe's or an override's);
    # its group follows from the export's run_info.json (pipeline/evaluation/wandb_log.py).
    import yaml

    with open(os.path.join(out, "train_config.yaml"), encoding="utf-8") as f:
        project = yaml.safe_load(f)["wandb"]["project"]
    eval_dir = os.path.join(out, "eval")
    run([sys.executable, os.path.join(REPO, "launch", "eval.py"), "--checkpoint", summary["export"]["merged"],
         "--shards", os.path.join(shards, "eval"), "--out", eval_dir, "--css-model", clip_text,
         "--max-new-tokens", "256", "--batch-size", "16", "--num-workers", "1", "--wandb-mode", "offline",
         "--wandb-dir", out, "--wandb-project", project])
    results = json.load(open(os.path.join(eval_dir, "results.json"), encoding="utf-8"))
    avg = results["sets"]["mmfr"]["average"]
    print(f"({time.monotonic() - t:.0f}s)")

    metrics = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
    print("\n=== done in {:.0f}s".format(time.monotonic() - t_all))
    print(f"train loss      {metrics[0]['train/loss']:.3f} (step 1) -> {metrics[-1]['train/loss']:.3f} "
          f"(step {metrics[-1]['step']})")
    print(f"eval (mean of 10 generators, chance 0.5): CPM accuracy {avg['cpm_acc']:.3f}, "
          f"AUC {avg['auc']:.3f}, answer accuracy {avg['acc']:.3f} "
          f"(strict {avg['acc_strict']:.3f}), {results['counts']['scored']} images")
    print(f"params per rank {run_info['params_per_rank']} of {run_info['params_total']} (ZeRO-3)")
    print(f"checkpoint      {os.path.join(summary['checkpoint_dir'], summary['final_checkpoint'] or '')}")
    print(f"exported model  {summary['export']['merged']}")
    print(f"trainables      {summary['export']['trainable']}")
    print(f"W&B offline run {summary['wandb_run_dir']}  (wandb sync {summary['wandb_run_dir']})")
    print(f"eval results    {os.path.join(eval_dir, 'results.md')} (+ results.json, predictions.jsonl, plots)")
    benchmark_step(out, summary["export"]["merged"], mmfr)
    predict_step(out, summary["export"]["merged"], mmfr)
    return 0


# Images the demo asks the model about at the end: real and fake of two generators.
PREDICT_IMAGES = {"kandinsky": 2, "flux": 2}


def predict_step(out: str, checkpoint: str, mmfr: str) -> list[dict]:
    """Ask the exported model about a few of the demo's own image files with
    fakereasoning-predict (python -m pipeline.inference): verdict, p(fake), the answer's
    sections, and evidence maps (PNG heat maps + .npy grids) under OUT/predict/."""
    from pipeline.inference.output import render

    t = step("extra: fakereasoning-predict on a few of the demo's own images, with evidence maps")
    files = []
    for gen, n in PREDICT_IMAGES.items():
        for label_dir in ("0_real", "1_fake"):
            folder = os.path.join(mmfr, "evaluation_sets", gen, label_dir)
            files += [os.path.join(folder, name) for name in sorted(os.listdir(folder))[:n // 2 or 1]]
    pred_dir = os.path.join(out, "predict")
    preds = os.path.join(pred_dir, "predictions.jsonl")
    run([sys.executable, "-m", "pipeline.inference", "--checkpoint", checkpoint, *files, "--out", preds,
         "--evidence", os.path.join(pred_dir, "evidence"), "--max-new-tokens", "256", "--batch-size", "8",
         "--num-workers", "1", "--no-progress"])
    records = [json.loads(x) for x in open(preds, encoding="utf-8")]
    print(f"({time.monotonic() - t:.0f}s)")
    print(render(records, "text"), end="")
    print(f"  predictions     {preds} (evidence maps in {os.path.join(pred_dir, 'evidence')})")
    return records


# The miniature benchmark: GenImage's layout (sharding/eval_sets/registry.py, adapter
# `folder`) built from demo evaluation images of two generators, under GenImage folder names.
BENCH_GENERATORS = {"stablediffusion": "imagenet_ai_0419_sdv4", "midjourney": "imagenet_midjourney"}
BENCH_PER_CLASS = 8
BENCH_JPEG = "jpeg:75,30"


def build_genimage_miniature(mmfr: str, src: str, per_class: int = BENCH_PER_CLASS) -> str:
    """SRC/<generator>/val/{nature,ai}/<image> from the synthetic MMFR's evaluation images
    (the last `per_class` real and fake of each generator, copied byte for byte)."""
    import shutil

    for gen, folder in BENCH_GENERATORS.items():
        for label_dir, genimage_dir in (("0_real", "nature"), ("1_fake", "ai")):
            names = sorted(os.listdir(os.path.join(mmfr, "evaluation_sets", gen, label_dir)))[-per_class:]
            dst = os.path.join(src, folder, "val", genimage_dir)
            os.makedirs(dst, exist_ok=True)
            for name in names:
                shutil.copyfile(os.path.join(mmfr, "evaluation_sets", gen, label_dir, name), os.path.join(dst, name))
    return src


def benchmark_step(out: str, checkpoint: str, mmfr: str) -> dict:
    """Shard a GenImage-layout miniature with the registry's adapter, score it clean and
    under two JPEG qualities, and print the robustness row and the ECE."""
    t = step(f"extra: miniature genimage benchmark, {BENCH_JPEG} robustness, calibration")
    src = build_genimage_miniature(mmfr, os.path.join(out, "bench", "genimage_src"))
    shards = os.path.join(out, "bench", "genimage_shards")
    run([sys.executable, "-m", "sharding.eval_sets", "genimage", src, shards, "--workers", "1", "--no-progress"])
    bench_eval = os.path.join(out, "bench", "eval")
    # Full answers (as the MMFR evaluation above): the CPM's p(fake) is read at the
    # answer's own conclusion, where the model was trained to give it. Cutting the
    # answers short forces the conclusion right after a partial answer instead, which
    # is out of distribution: at 48 tokens every p(fake) fell below 0.5 (accuracy
    # 0.500 while the AUC was 0.891; benchmarks/bench_predict.py measures the same
    # effect for --detect-only).
    run([sys.executable, os.path.join(REPO, "launch", "eval.py"), "--checkpoint", checkpoint,
         "--benchmark", f"genimage={shards}", "--out", bench_eval, "--perturb", BENCH_JPEG,
         "--max-new-tokens", "256", "--batch-size", "16", "--num-workers", "1", "--wandb-mode", "disabled",
         "--no-progress", "--restart"])  # a minute of work: always from scratch, whatever an older run left
    results = json.load(open(os.path.join(bench_eval, "results.json"), encoding="utf-8"))
    rows = results["robustness"]["genimage"]["jpeg"]
    avg = results["sets"]["genimage"]["average"]
    print(f"({time.monotonic() - t:.0f}s)")
    print(f"genimage miniature ({results['counts']['scored']} images, mean of {len(BENCH_GENERATORS)} generators)")
    print("  JPEG robustness, CPM accuracy / AUC: " + " | ".join(
        f"{r['perturbation']} {r['cpm_acc']:.3f} / {'n/a' if r['auc'] is None else format(r['auc'], '.3f')}"
        for r in rows))
    print(f"  calibration of p(fake): ECE {avg['ece']:.4f} (15 bins), NLL {avg['nll']:.4f}, Brier {avg['brier']:.4f}")
    print("  (CPM accuracy: the share of images whose p(fake) is on the right side of 0.5; AUC: how well p(fake)\n"
          "   ranks fakes above reals; both 0.5 by chance. The miniature's generators, stablediffusion and\n"
          "   midjourney, are ones the demo model separates (100% and 90% on the MMFR set above); JPEG at\n"
          "   quality 30 shows how far its synthetic traces survive compression. ECE, NLL and Brier: how far\n"
          "   p(fake) is from a calibrated probability, 0 at best.)")
    print(f"  results         {os.path.join(bench_eval, 'results.md')} (+ reliability and robustness plots)")
    return results


if __name__ == "__main__":
    sys.exit(main())
