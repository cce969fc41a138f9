"""fakereasoning-predict: detect-only against the full mode, predict against the
evaluation on the same images, and memory against the number of inputs.

    .venv/bin/python benchmarks/bench_predict.py                # after `make demo` (phase 1 uses its model)
    .venv/bin/python benchmarks/bench_predict.py --skip-demo    # phases 2 and 3 only

1. detect-only vs full (issue 22, section 3), on the demo's evaluation set
   (DEMO/mmfr/evaluation_sets: --per-generator real and fake images of each of the
   10 synthetic generators) with the demo's trained model (DEMO/export/merged):
   CPM accuracy (p(fake) >= 0.5) and AUC of both modes, and images/s of both at
   the same batch size. The model was trained with the reasoning before the
   conclusion; detect-only forces the conclusion right after the prompt.
2. predict vs eval throughput: --images random images in a 0_real/1_fake folder,
   sharded with the registry's folder adapter, scored by fakereasoning-eval's
   run_eval from the shards and by fakereasoning-predict's run_predict from the
   files, same tiny model, batch size, generation settings and loader workers, in
   this process, alternated --repeats times: the best images/s of each one's
   scoring phase (eval: results.json run.images_per_s_scoring; predict:
   Summary.scoring_seconds) and their ratio (goal: predict >= 0.9 x eval).
3. memory vs inputs: `fakereasoning-predict --detect-only --list FILE` over 1,000
   and 10,000 listed files (small PNGs), each in its own process; peak resident
   memory of the process tree (main + loader workers, sampled every 50 ms) and
   the ratio (goal: about 1, i.e. independent of the number of inputs).

Results go to stdout and benchmarks/results/bench_predict.{json,md}. Wall times on
a shared machine are noisy: compare figures of one run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.bench_common import write_results  # noqa: E402


def _labelled_folder(root: str, n: int, size: int, seed: int = 0) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for lab in ("0_real", "1_fake"):
        os.makedirs(os.path.join(root, lab), exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(root, ("0_real", "1_fake")[i % 2], f"{i:06d}.png"))
    return root


def _scores(records) -> dict:
    from pipeline.evaluation.metrics import auc_ap

    ok = [r for r in records if r["status"] == "ok" and r["p_fake"] is not None]
    labels = [1 if "/1_fake/" in r["path"] else 0 for r in ok]
    p = [r["p_fake"] for r in ok]
    acc = sum((pf >= 0.5) == bool(y) for pf, y in zip(p, labels)) / len(ok) if ok else None
    auc, _ = auc_ap(labels, p)
    return {"images": len(ok), "cpm_acc": acc, "auc": auc,
            "called_fake": sum(pf >= 0.5 for pf in p) / len(ok) if ok else None,
            "p_fake_min": min(p, default=None), "p_fake_max": max(p, default=None)}


def _predict(cfg):
    import json

    from pipeline.inference.run import run_predict

    s = run_predict(cfg)
    with open(cfg.out, encoding="utf-8") as fh:
        records = [json.loads(x) for x in fh]
    return s, records


def detect_only_vs_full(args, work: str) -> dict:
    from pipeline.inference.config import PredictConfig

    ckpt = os.path.join(args.demo, "export", "merged")
    eval_sets = os.path.join(args.demo, "mmfr", "evaluation_sets")
    if not os.path.isdir(ckpt) or not os.path.isdir(eval_sets):
        raise SystemExit(f"{args.demo}: no demo model or evaluation set; run `make demo` first (or --skip-demo)")
    lst = os.path.join(work, "demo_eval.txt")
    with open(lst, "w", encoding="utf-8") as fh:
        for gen in sorted(os.listdir(eval_sets)):
            for lab in ("0_real", "1_fake"):
                folder = os.path.join(eval_sets, gen, lab)
                if os.path.isdir(folder):
                    for name in sorted(os.listdir(folder))[:args.per_generator]:
                        fh.write(os.path.join(folder, name) + "\n")
    out = {}
    for mode in ("full", "detect_only"):
        cfg = PredictConfig(checkpoint=ckpt, list_file=lst, out=os.path.join(work, f"demo_{mode}.jsonl"),
                            batch_size=args.batch_size, num_workers=1, progress=False, restart=True,
                            detect_only=mode == "detect_only",
                            max_new_tokens=None if mode == "detect_only" else args.demo_max_new_tokens).validate()
        s, records = _predict(cfg)
        out[mode] = {**_scores(records), "seconds": s.scoring_seconds,
                     "images_per_s": s.scored / s.scoring_seconds}
        print(f"  {mode:12s} {out[mode]}", flush=True)
    out["speedup"] = out["detect_only"]["images_per_s"] / out["full"]["images_per_s"]
    return out


def predict_vs_eval(args, work: str) -> dict:
    from launch.tiny_models import build_tiny_model
    from pipeline.evaluation.config import EvalConfig
    from pipeline.evaluation.runner import run_eval
    from pipeline.inference.config import PredictConfig
    from sharding.eval_sets.cli import main as shard_benchmark

    model = build_tiny_model(os.path.join(work, "model"))
    folder = _labelled_folder(os.path.join(work, "thousand"), args.images, 48)
    shards = os.path.join(work, "thousand_shards")
    assert shard_benchmark(["chameleon", folder, shards, "--workers", "1", "--no-progress"]) == 0
    common = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, num_workers=1)
    eval_rates, pred_rates = [], []
    for _ in range(args.repeats):  # alternated, best of each: the machine's noise hits both alike
        results = run_eval(EvalConfig(checkpoint=model, out=os.path.join(work, "eval"), benchmarks={"b": shards},
                                      plots=False, progress=False, restart=True, **common))
        eval_rates.append(results["run"]["images_per_s_scoring"])
        s, _ = _predict(PredictConfig(checkpoint=model, inputs=[folder], out=os.path.join(work, "pred.jsonl"),
                                      progress=False, restart=True, **common))
        pred_rates.append(s.scored / s.scoring_seconds)
    eval_rate, pred_rate = max(eval_rates), max(pred_rates)
    out = {"images": args.images, "eval_images_per_s": eval_rate, "predict_images_per_s": pred_rate,
           "ratio": pred_rate / eval_rate, "eval_all": eval_rates, "predict_all": pred_rates}
    print(f"  {out}", flush=True)
    return out


def _peak_rss(cmd: list[str], env: dict) -> tuple[int, float]:
    """(peak RSS bytes of the process and its children, seconds)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            total = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, total)
        except psutil.Error:
            pass
        time.sleep(0.05)
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd}: exit {proc.returncode}\n{err[-2000:]}")
    return peak, time.perf_counter() - t0


def memory_vs_inputs(args, work: str) -> dict:
    model = os.path.join(work, "model")
    if not os.path.isdir(model):
        from launch.tiny_models import build_tiny_model

        build_tiny_model(model)
    folder = _labelled_folder(os.path.join(work, "many"), max(args.memory_inputs), 16, seed=1)
    names = sorted(os.path.join(folder, lab, n) for lab in ("0_real", "1_fake")
                   for n in os.listdir(os.path.join(folder, lab)))
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    out = {}
    for n in args.memory_inputs:
        lst = os.path.join(work, f"list_{n}.txt")
        with open(lst, "w", encoding="utf-8") as fh:
            fh.write("\n".join(names[:n]) + "\n")
        peak, secs = _peak_rss([sys.executable, "-m", "pipeline.inference", "--checkpoint", model, "--list", lst,
                                "--detect-only", "--batch-size", str(args.batch_size), "--num-workers", "1",
                                "--out", os.path.join(work, f"mem_{n}.jsonl"), "--restart", "--no-progress"], env)
        out[str(n)] = {"peak_rss_mb": peak / 2**20, "seconds": secs}
        print(f"  {n} inputs: peak RSS {peak / 2**20:.0f} MB in {secs:.0f}s", flush=True)
    lo, hi = (str(n) for n in (min(args.memory_inputs), max(args.memory_inputs)))
    out["ratio"] = out[hi]["peak_rss_mb"] / out[lo]["peak_rss_mb"]
    return out


def render(results: dict, args, machine: str) -> str:
    lines = ["# fakereasoning-predict", "", f"Machine: {machine}. Command: `python benchmarks/bench_predict.py`", ""]
    d = results.get("detect_only_vs_full")
    if d:
        lines += ["## Detect-only vs full (demo model, demo evaluation set)", "",
                  "| mode | images | CPM accuracy | AUC | called fake | p(fake) range | images/s |",
                  "|---|---|---|---|---|---|---|"]
        for m in ("full", "detect_only"):
            r = d[m]
            auc = "n/a" if r["auc"] is None else f"{r['auc']:.3f}"
            lines.append(f"| {m} | {r['images']} | {r['cpm_acc']:.3f} | {auc} | {r['called_fake']:.1%} | "
                         f"{r['p_fake_min']:.3f}-{r['p_fake_max']:.3f} | {r['images_per_s']:.2f} |")
        lines += ["", f"detect-only speed-up: {d['speedup']:.1f}x", ""]
    p = results["predict_vs_eval"]
    lines += ["## Predict vs eval on the same images", "",
              f"{p['images']} images, batch {args.batch_size}, {args.max_new_tokens} new tokens, tiny random model: "
              f"eval {p['eval_images_per_s']:.2f} images/s, predict {p['predict_images_per_s']:.2f} images/s, "
              f"ratio {p['ratio']:.2f} (goal >= 0.9); best of {args.repeats} alternated runs each", ""]
    m = results["memory_vs_inputs"]
    sizes = [k for k in m if k != "ratio"]
    lines += ["## Memory vs number of inputs (detect-only, process tree peak RSS)", "",
              " | ".join(f"{k} inputs: {m[k]['peak_rss_mb']:.0f} MB" for k in sizes) +
              f" | ratio {m['ratio']:.3f} (goal about 1)", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default=os.path.join(REPO, "runs", "demo"), help="make demo's output (default runs/demo)")
    p.add_argument("--skip-demo", action="store_true", help="skip phase 1 (needs make demo's model)")
    p.add_argument("--per-generator", type=int, default=20,
                   help="phase 1: real and fake images per generator (default 20, 400 images)")
    p.add_argument("--demo-max-new-tokens", type=int, default=256, help="phase 1 full mode answer limit (default 256)")
    p.add_argument("--images", type=int, default=1000, help="phase 2 images (default 1000)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of every phase (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="phase 2 answer limit (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="phase 2: alternated runs of each, best taken (default 3)")
    p.add_argument("--memory-inputs", type=int, nargs=2, default=[1000, 10000], help="phase 3 input counts")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "bench_predict"))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory(dir=os.path.join(REPO, "benchmarks", "results"), prefix="tmp_predict") as work:
        if not args.skip_demo:
            print("1. detect-only vs full on the demo's evaluation set", flush=True)
            results["detect_only_vs_full"] = detect_only_vs_full(args, work)
        print("2. predict vs eval, same images", flush=True)
        results["predict_vs_eval"] = predict_vs_eval(args, work)
        print("3. memory vs number of inputs", flush=True)
        results["memory_vs_inputs"] = memory_vs_inputs(args, work)
    print(write_results(args.out, args, results, render))
    return 0


if __name__ == "__main__":
    sys.exit(main())
