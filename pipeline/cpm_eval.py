"""CPM accuracy of an exported model on evaluation shards: a quick, single-process check.

For every image of OUT/eval/<generator>/ the model answers the evaluation
question (greedy generation, as at evaluation time), then `score_p_fake` reads
p(fake) from the real/fake logits after "<CONCLUSION>This image is" in that
answer (forced after it when the answer has no conclusion), and the image
counts as detected fake when p(fake) > 0.5. This is the paper's protocol: the
conclusion follows the model's own reasoning. (Scoring with the prefix forced
right after the question, `--no-generate`, asks the model something it never
saw in training, where every conclusion follows a reasoning text.)
The full evaluation (parsing, BLEU/ROUGE/CSS, several GPUs) is
pipeline/evaluation; this single-process check is what the demo uses to show
that training learned.

    python -m pipeline.cpm_eval MODEL_DIR SHARDS/eval [--out results.json]
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import tarfile
from typing import Iterator

import torch
from PIL import Image

from sharding.schema import EVAL_QUESTION, GENERATORS


def eval_sets(eval_root: str) -> dict[str, list[str]]:
    """generator -> its shard files, generators in the reference order first."""
    names = sorted(d for d in os.listdir(eval_root) if os.path.isdir(os.path.join(eval_root, d)))
    names = [g for g in GENERATORS if g in names] + [g for g in names if g not in GENERATORS]
    sets = {g: sorted(glob.glob(os.path.join(eval_root, g, "*.tar"))) for g in names}
    sets = {g: s for g, s in sets.items() if s}
    if not sets:
        raise FileNotFoundError(f"{eval_root}: no <generator>/*.tar evaluation shards")
    return sets


def read_samples(shards: list[str]) -> Iterator[tuple[str, bytes, dict]]:
    """(key, image bytes, metadata) of every sample, in shard order."""
    for path in shards:
        pending: dict[str, dict] = {}
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                key, _, ext = base.partition(".")
                entry = pending.setdefault(key, {})
                entry["json" if ext == "json" else "image"] = tar.extractfile(member).read()
                if "json" in entry and "image" in entry:
                    yield key, entry["image"], json.loads(entry.pop("json"))
                    del pending[key]
        if pending:
            raise ValueError(f"{path}: incomplete samples {sorted(pending)[:5]}")


@torch.no_grad()
def cpm_accuracy(model, eval_root: str, batch_size: int = 32, limit_per_set: int | None = None,
                 generate: bool = True, max_new_tokens: int = 256) -> dict:
    """Accuracy, real/fake accuracy and AUC of p(fake) > 0.5, per generator and averaged."""
    from sklearn.metrics import roc_auc_score

    from modeling.image_processing import ImageProcessor

    processor = ImageProcessor(model.config)
    model.eval()
    results: dict[str, dict] = {}
    for gen, shards in eval_sets(eval_root).items():
        labels: list[int] = []
        scores: list[float] = []
        batch: list[torch.Tensor] = []

        def flush() -> None:
            if batch:
                pixels, prompts = torch.stack(batch), [EVAL_QUESTION] * len(batch)
                answers = model.generate(pixels, prompts, max_new_tokens=max_new_tokens) if generate else None
                p = model.score_p_fake(pixels, prompts, answers)
                scores.extend(p.float().tolist())
                batch.clear()

        for i, (_, image, meta) in enumerate(read_samples(shards)):
            if limit_per_set is not None and i >= limit_per_set:
                break
            batch.append(processor(Image.open(io.BytesIO(image))))
            labels.append(int(meta["label"]))
            if len(batch) == batch_size:
                flush()
        flush()
        pred = [int(s > 0.5) for s in scores]
        real = [p == y for p, y in zip(pred, labels) if y == 0]
        fake = [p == y for p, y in zip(pred, labels) if y == 1]
        results[gen] = {
            "n": len(labels),
            "accuracy": sum(p == y for p, y in zip(pred, labels)) / len(labels),
            "real_accuracy": sum(real) / len(real) if real else None,
            "fake_accuracy": sum(fake) / len(fake) if fake else None,
            "auc": roc_auc_score(labels, scores) if len(set(labels)) == 2 else None,
        }
    n = sum(r["n"] for r in results.values())
    summary = {
        "mean_accuracy": sum(r["accuracy"] for r in results.values()) / len(results),
        "overall_accuracy": sum(r["accuracy"] * r["n"] for r in results.values()) / n,
        "mean_auc": _mean(r["auc"] for r in results.values()),
        "images": n,
        "chance": 0.5,
        "protocol": "generate then score_p_fake" if generate else "score_p_fake, prefix forced after the question",
    }
    return {"summary": summary, "per_generator": results}


def _mean(values) -> float | None:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="merged model directory (export/merged of a training run)")
    p.add_argument("eval_root", help="evaluation shard root: <generator>/shard-*.tar")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit-per-set", type=int, default=None, help="images per generator at most")
    p.add_argument("--no-generate", action="store_true",
                   help="score with the conclusion prefix forced right after the question (no generation)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation budget per answer (default 256)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    from modeling.checkpoint import load_pretrained

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    model, _ = load_pretrained(args.model_dir)
    res = cpm_accuracy(model, args.eval_root, args.batch_size, args.limit_per_set,
                       generate=not args.no_generate, max_new_tokens=args.max_new_tokens)
    text = json.dumps(res, indent=1)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
