"""Evaluation throughput: batched scoring vs the reference's way, and 1 vs 2 ranks.

The reference evaluates on one GPU with batch size 1 and reloads the CLIP text
model for every sample to compute CSS. This benchmark runs, on the tiny preset
and the same synthetic MMFR evaluation images (launch.tiny_models):

  1. in one process, one model load, the same images:
       batched    score_items with --batch-size, CSS with the CLIP text model
                  loaded once and batched (this project's runner code)
       reference  batch size 1, and a CLIP text model loaded from disk for
                  every sample (what the reference does)
     Both compute the same outputs (answer, parse, p(fake), BLEU-1, ROUGE-L,
     CSS) and the answers are checked to be identical, so only the way of
     scoring differs. Model loading is outside the timed region for both.
  2. launch/eval.py through the `deepspeed` launcher with 1 and with 2 ranks
     (one thread per rank): images/s of the scoring phase, i.e. images / the
     slowest rank's (generation + text metrics) seconds, and the wall time of
     the whole command.
  3. one forward per image: the runner's scoring (Scorer, generation + p(fake))
     the two-pass way ("before": generate, then score_p_fake's full forward
     over prompt + answer for every image) and the one-pass way ("after": p(fake)
     read from the logits generation computed after the answer's conclusion
     prefix, the forced forward only for answers without one), same model, same
     images, same seeds, in both protocols (ours: greedy; reference: sampling at
     0.2). Full forwards per image, images/s of scoring, identical answers, and
     the largest |p(fake) difference|. A random-weight model never writes a
     conclusion (every image falls back), so it runs on the tiny model taught
     the answer layout first (`fit_layout_model`, some seconds of training) and
     on the random one (the no-conclusion case: no gain, no loss expected).

    .venv/bin/python benchmarks/bench_eval.py             # a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_eval.py --help

Results go to stdout and to benchmarks/results/bench_eval.{json,md}. Goals
(issue 5): batched >= 5x the reference's way; 2 ranks >= 1.7x of 1 rank.
Phase 3: 1 forward per image where answers conclude, the same p(fake) to 1e-5.
On a shared machine wall times are noisy: rerun and compare runs made together.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_process(setup, args) -> dict:
    """Phase 1: batched vs reference way, same images, same model, same process."""
    import torch

    from modeling.image_processing import ImageProcessor
    from pipeline.evaluation.config import EvalConfig
    from pipeline.evaluation.data import enumerate_items
    from pipeline.evaluation.metrics import CSSScorer, text_scores
    from pipeline.evaluation.runner import Scorer, add_text_scores, load_model, score_items

    torch.set_num_threads(1)
    items = enumerate_items({"mmfr": setup.shards})
    out = {"images": len(items)}
    for mode in ("batched", "reference"):
        cfg = EvalConfig(checkpoint=setup.model, out="-", shards=setup.shards, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size if mode == "batched" else 1, num_workers=1,
                         css_model=setup.clip_text)
        model, _, _ = load_model(cfg)
        scorer = Scorer(model, cfg, torch.device("cpu"))
        processor = ImageProcessor(model.config)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        rows, failures = score_items(scorer, items, processor, cfg, show_progress=False)
        t_gen = time.perf_counter()
        if mode == "batched":
            add_text_scores(rows, CSSScorer(setup.clip_text, batch_size=cfg.css_batch_size))
        else:
            for r in rows:  # the reference: a fresh CLIP text model for every sample
                r.update(text_scores([r["reference"]], [r["reasoning"]], CSSScorer(setup.clip_text))[0])
        t_end = time.perf_counter()
        assert not failures, failures
        out[mode] = {"seconds": t_end - t0, "generate_s": t_gen - t0, "text_s": t_end - t_gen,
                     "images_per_s": len(rows) / (t_end - t0)}
        out[f"{mode}_answers"] = {r["key"]: r["answer"] for r in rows}
        del model, scorer
    same = out.pop("batched_answers") == out.pop("reference_answers")
    out["same_answers"] = same
    out["speedup"] = out["batched"]["images_per_s"] / out["reference"]["images_per_s"]
    return out


def fit_layout_model(setup, out_dir: str, steps: int, seed: int = 0) -> str:
    """The setup's tiny model taught to answer in the MMFR layout (a short summary,
    caption and reasoning, then "<CONCLUSION> This image is real/fake."), trained on
    the evaluation images with their labels, everything but the frozen towers
    (like launch/demo.py's tiny run); exported merged to out_dir. Deterministic."""
    import torch

    from modeling.checkpoints.checkpoint import export_merged
    from modeling.image_processing import ImageProcessor
    from modeling.template import build_training_example
    from pipeline.evaluation.config import EvalConfig
    from pipeline.evaluation.data import enumerate_items, make_eval_loader
    from pipeline.evaluation.runner import load_model
    from sharding.schema import EVAL_QUESTION, FAKE_CONCLUSION, REAL_CONCLUSION
    from sharding.synthetic.annotations import layout_answer

    torch.manual_seed(seed)
    model, tok, _ = load_model(EvalConfig(checkpoint=setup.model, out="-", shards=setup.shards))
    batches = list(make_eval_loader(enumerate_items({"mmfr": setup.shards}), ImageProcessor(model.config), 8, 0))
    px = torch.cat([b["pixel_values"] for b in batches])
    labels = torch.tensor([s["label"] for b in batches for s in b["samples"]])
    answers = [layout_answer("I will check the image.", "A scene.",
                             f"The texture looks {'unnatural' if y else 'natural'}.",
                             FAKE_CONCLUSION if y else REAL_CONCLUSION) for y in labels.tolist()]
    exs = [build_training_example(tok, EVAL_QUESTION, a) for a in answers]
    t = max(len(e.input_ids) for e in exs)
    ids = torch.full((len(exs), t), tok.pad_token_id)
    targets = torch.full((len(exs), t), -100)
    mask = torch.zeros((len(exs), t), dtype=torch.long)
    for i, e in enumerate(exs):
        ids[i, :len(e.input_ids)], targets[i, :len(e.labels)], mask[i, :len(e.input_ids)] = (
            torch.tensor(e.input_ids), torch.tensor(e.labels), 1)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(("clip_tower.", "dino_tower.")))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(exs), generator=order)[:8]
        loss = model(px[idx], ids[idx], mask[idx], targets[idx], labels[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    export_merged(model.eval(), tok, out_dir)
    return out_dir


def one_forward(setup, args, work: str) -> dict:
    """Phase 3: the two-pass ("before") and one-pass ("after") scoring, same run."""
    import torch

    from modeling.image_processing import ImageProcessor
    from pipeline.evaluation.config import EvalConfig
    from pipeline.evaluation.data import enumerate_items
    from pipeline.evaluation.runner import Scorer, load_model, score_items

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    fitted = fit_layout_model(setup, os.path.join(work, "layout_model"), args.fit_steps)
    out = {"fit_s": time.perf_counter() - t0, "cases": {}}
    items = enumerate_items({"mmfr": setup.shards})
    for model_name, checkpoint in (("layout-trained", fitted), ("random", setup.model)):
        for protocol in ("ours", "reference"):
            # The reference protocol's sampling with the Vicuna v1 prompt: the one the
            # tiny model was taught on (under llava_v1's it does not conclude).
            cfg = EvalConfig(checkpoint=checkpoint, out="-", shards=setup.shards, protocol=protocol,
                             max_new_tokens=args.one_pass_max_new_tokens, batch_size=args.batch_size,
                             num_workers=1, conversation="vicuna_v1" if protocol == "reference" else None)
            model, tok, _ = load_model(cfg)
            processor = ImageProcessor(model.config)
            ways: dict[str, dict] = {}
            # Interleaved repeats, the best kept: on a shared machine the other
            # jobs' load then hits both ways alike.
            for _ in range(args.repeats):
                for way, one_pass in (("before", False), ("after", True)):
                    scorer = Scorer(model, cfg, torch.device("cpu"), tok, one_pass=one_pass)
                    t = time.perf_counter()
                    rows, failures = score_items(scorer, items, processor, cfg, show_progress=False)
                    seconds = time.perf_counter() - t
                    assert not failures, failures
                    w = ways.setdefault(way, {"seconds": float("inf")})
                    w.update(seconds=min(w["seconds"], seconds), images=len(rows),
                             forwards_per_image=scorer.forwards / scorer.images,
                             answers={r["key"]: r["answer"] for r in rows},
                             p_fake={r["key"]: r["p_fake"] for r in rows})
            before, after = ways["before"], ways["after"]
            diffs = [abs(after["p_fake"][k] - p) for k, p in before["p_fake"].items()]
            case = {"protocol": protocol, "model": model_name, "images": before["images"],
                    "same_answers": before.pop("answers") == after.pop("answers"),
                    "max_abs_p_fake_diff": max(diffs),
                    "p_fake_from_generation_frac": 2.0 - after["forwards_per_image"]}
            for w in (before, after):
                w.pop("p_fake")
                w["images_per_s"] = w["images"] / w["seconds"]
            case.update(before=before, after=after, speedup=after["images_per_s"] / before["images_per_s"])
            out["cases"][f"{model_name}/{protocol}"] = case
            del model
    return out


def ranks(setup, args, work: str) -> dict:
    """Phase 2: launch/eval.py with 1 and 2 ranks through the deepspeed launcher."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=REPO)
    deepspeed = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    out = {}
    for n in (1, 2):
        res_dir = os.path.join(work, f"ranks{n}")
        cmd = [deepspeed, "--num_gpus", str(n), "--master_port", str(_free_port()),
               os.path.join(REPO, "launch", "eval.py"), "--checkpoint", setup.model, "--shards", setup.shards,
               "--out", res_dir, "--css-model", setup.clip_text, "--batch-size", str(args.batch_size),
               "--max-new-tokens", str(args.max_new_tokens), "--num-workers", "1", "--no-plots",
               "--no-progress", "--wandb-mode", "disabled"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        with open(os.path.join(res_dir, "results.json"), encoding="utf-8") as f:
            r = json.load(f)
        slowest = max(p["generate_s"] + p["text_metrics_s"] for p in r["run"]["per_rank"])
        slowest_cpu = max(p["generate_cpu_s"] + p["text_metrics_cpu_s"] for p in r["run"]["per_rank"])
        out[f"{n}"] = {"images": r["counts"]["scored"], "scoring_s": slowest,
                       "images_per_s": r["counts"]["scored"] / slowest, "wall_s": wall,
                       "slowest_rank_cpu_s": slowest_cpu,
                       "images_per_rank_cpu_s": r["counts"]["scored"] / slowest_cpu,
                       "per_rank": r["run"]["per_rank"]}
        with open(os.path.join(res_dir, "predictions.jsonl"), encoding="utf-8") as f:
            out[f"{n}"]["answers"] = [json.loads(line)["answer"] for line in f]
    out["same_answers"] = out["1"].pop("answers") == out["2"].pop("answers")
    out["speedup"] = out["2"]["images_per_s"] / out["1"]["images_per_s"]
    out["cpu_speedup"] = out["2"]["images_per_rank_cpu_s"] / out["1"]["images_per_rank_cpu_s"]
    return out


def render(result: dict) -> str:
    a, r = result["in_process"], result["ranks"]
    lines = [
        f"Tiny preset, {a['images']} synthetic MMFR evaluation images, max_new_tokens "
        f"{result['args']['max_new_tokens']}, batch size {result['args']['batch_size']}, CPU, "
        f"{os.cpu_count()} cores (shared), one thread per process.",
        "",
        "| way of scoring | images/s | seconds | generation s | text metrics s |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, label in (("reference", "reference way (batch 1, CLIP text model reloaded per sample)"),
                        ("batched", f"batched (batch {result['args']['batch_size']}, CLIP loaded once)")):
        m = a[mode]
        lines.append(f"| {label} | {m['images_per_s']:.2f} | {m['seconds']:.2f} | {m['generate_s']:.2f} | "
                     f"{m['text_s']:.2f} |")
    lines += [f"", f"Batched / reference: **{a['speedup']:.2f}x** (goal >= 5x); identical answers: "
                   f"{a['same_answers']}.", "",
              "| ranks (deepspeed launcher) | images/s (scoring wall) | slowest rank s | slowest rank CPU s | "
              "wall s (whole command) |",
              "|---|---:|---:|---:|---:|"]
    for n in ("1", "2"):
        m = r[n]
        lines.append(f"| {n} | {m['images_per_s']:.2f} | {m['scoring_s']:.2f} | {m['slowest_rank_cpu_s']:.2f} | "
                     f"{m['wall_s']:.1f} |")
    lines += ["", f"2 ranks / 1 rank: **{r['speedup']:.2f}x** by scoring wall time (goal >= 1.7x), "
                  f"{r['cpu_speedup']:.2f}x by the slowest rank's CPU time (the wall-time speedup when each "
                  f"rank has a free core); identical answers: {r['same_answers']}. Load average at start: "
                  f"{result['loadavg'][0]:.2f} on {os.cpu_count()} cores."]
    if result.get("one_forward"):
        lines += ["", render_one_forward(result["one_forward"], result["args"])]
    return "\n".join(lines)


def render_one_forward(o: dict, args: dict) -> str:
    lines = [f"One forward per image (phase 3): runner scoring (generation + p(fake)), max_new_tokens "
             f"{args['one_pass_max_new_tokens']}, batch size {args['batch_size']}, best of {args['repeats']} "
             f"interleaved runs; the layout-trained model took {o['fit_s']:.1f} s to fit ({args['fit_steps']} steps).",
             "",
             "| model / protocol | images | forwards/image before | after | images/s before | after | after/before "
             "| identical answers | max abs p_fake diff |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for name, c in o["cases"].items():
        b, a = c["before"], c["after"]
        lines.append(f"| {name} | {c['images']} | {b['forwards_per_image']:.2f} | {a['forwards_per_image']:.2f} | "
                     f"{b['images_per_s']:.2f} | {a['images_per_s']:.2f} | **{c['speedup']:.2f}x** | "
                     f"{c['same_answers']} | {c['max_abs_p_fake_diff']:.1e} |")
    lines += ["", "ours = greedy; reference = sampling at temperature 0.2 seeded per batch; both with the Vicuna v1 "
                  "prompt (the one the layout-trained model learnt; under llava_v1's it does not conclude). "
                  "The random model never concludes, so every image keeps the forced forward (2 per image) "
                  "both ways."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images-per-generator", type=int, default=12, help="evaluation images per generator (even)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of the batched way and of the rank runs")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation length")
    p.add_argument("--workdir", help="keep the setup and outputs here (default: a temporary folder)")
    p.add_argument("--skip-ranks", action="store_true", help="only the in-process comparisons")
    p.add_argument("--one-pass-max-new-tokens", type=int, default=96,
                   help="generation length of phase 3 (the layout-trained answers take about 60 tokens)")
    p.add_argument("--fit-steps", type=int, default=150, help="training steps of phase 3's layout-trained model")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs of each way in phase 3 (best kept)")
    p.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results"),
                   help="folder for bench_eval.json/.md")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from launch.tiny_models import build_tiny_setup

    work = args.workdir or tempfile.mkdtemp(prefix="bench_eval_")
    setup = build_tiny_setup(os.path.join(work, "setup"), args.images_per_generator)
    result = {"args": vars(args), "loadavg": os.getloadavg(), "in_process": in_process(setup, args)}
    result["one_forward"] = one_forward(setup, args, work)
    result["ranks"] = None if args.skip_ranks else ranks(setup, args, work)
    if result["ranks"]:
        text = render(result)
        os.makedirs(args.results, exist_ok=True)
        with open(os.path.join(args.results, "bench_eval.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.results, "bench_eval.md"), "w", encoding="utf-8") as f:
            f.write("# bench_eval\n\n`" + " ".join(["benchmarks/bench_eval.py", *(argv or sys.argv[1:])]) + "`\n\n"
                    + text + "\n")
        print(text)
    else:
        print(json.dumps(result["in_process"], indent=1))
        print(render_one_forward(result["one_forward"], result["args"]))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
