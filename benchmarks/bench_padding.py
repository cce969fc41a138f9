"""Padding and label balance of training batches: random vs length-grouped.

Right padding wastes LLM positions: a batch is as long as its longest row. The
LLM sees every row widened by the image tokens the model splices in place of
the one <image> placeholder (N - 1 more positions per row, N = 16 for the tiny
preset, 576 for the paper's 336 px / 14 px patches), so for a batch of B rows
of token lengths T_row, padded to T_max:

    padding share = sum_rows (T_max - T_row) / (B x (T_max + N - 1))

This script, in one run:
  1. writes a synthetic MMFR (`python -m sharding.synthetic`; answers in the
     real LLaVA-CoT layout, SUMMARY / CAPTION / REASONING / CONCLUSION, with 1-5
     reasoning attributes, so lengths vary about 2x) and shards it
     (`python -m sharding.shard_mmfr`);
  2. builds the demo-style byte-level BPE from the shards, as a run without
     tokenizer.path does (pipeline/training/build.py prepare_tokenizer);
  3. streams one epoch per rank through the real loader (make_train_loader) for
     random batches (data.group_by_length=false) and length-grouped ones with
     several data.group_min_label_share values (0: by length alone; 0.375, the
     default: at least 3 of 8 rows of each label; 0.5: even batches) and
     data.group_window sizes;
  4. reports the padding share (token-weighted over the epoch) with N = 16 and
     N = 576, and the label balance: mean over batches of min(real, fake) / B,
     and the share of label-pure batches;
  5. replays the grouping on the same (length, label) stream with every fake
     row's token length scaled by 1 + a share (MMFR's fake and real answers
     may differ in length more than the synthetic ones, 3% here), using the
     stream's own grouping function and seeds; at share 0 the replay must give
     the real stream's grouped batches row for row, which the script checks
     (exit status 1 otherwise).

    .venv/bin/python benchmarks/bench_padding.py            # about a minute on 2 cores
    .venv/bin/python benchmarks/bench_padding.py --help
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench_common import make_synthetic_shards, write_results  # noqa: E402 - the script's own folder is on sys.path

from pipeline.data.config import DataConfig  # noqa: E402 - after the path set-up

IMAGE_TOKENS = {"tiny": 16, "paper": 576}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-images", type=int, default=2000, help="synthetic training images (default 2000)")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch per rank (default 8)")
    p.add_argument("--world-size", type=int, default=2, help="ranks whose epochs are streamed (default 2)")
    p.add_argument("--windows", default="4,8,16,32", help="data.group_window values (default 4,8,16,32)")
    p.add_argument("--default-window", type=int, default=16, help="window of the main table (default 16)")
    p.add_argument("--shares", default="0,0.25,0.375,0.5",
                   help="data.group_min_label_share values of the main table (default 0,0.25,0.375,0.5)")
    p.add_argument("--sweep-shares", default="0,0.375", help="shares of the window sweep (default 0,0.375)")
    p.add_argument("--fake-longer", default="0.1,0.25",
                   help="replays with fake answers longer by these shares (default 0.1,0.25)")
    p.add_argument("--seed", type=int, default=0, help="data.seed (default 0)")
    p.add_argument("--work-dir", default=None, help="data folder (default: a temporary one, removed)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "bench_padding"),
                   help="results prefix: writes <out>.md and <out>.json")
    return p.parse_args(argv)


def make_shards(work: str, train_images: int) -> str:
    return os.path.join(make_synthetic_shards(work, train_images, image_size=32, samples_per_shard=125), "train")


def make_tokenizer(train: str, work: str):
    """The tokenizer a run with tokenizer.path null builds (same corpus, same size)."""
    from modeling.tokenization.tokenizer import build_bpe_tokenizer
    from pipeline.data.corpus import tokenizer_corpus
    from pipeline.training.config import TokenizerConfig

    defaults = TokenizerConfig()
    corpus = tokenizer_corpus(train, defaults.corpus_samples)
    tokenizer = build_bpe_tokenizer(corpus, os.path.join(work, "tokenizer"), vocab_size=defaults.vocab_size)
    return tokenizer, defaults.vocab_size


# --------------------------------------------------------------------------- metrics

def batch_rows(b) -> tuple[list[int], list[int]]:
    """(token length of each row, forgery label of each row) of a loader batch."""
    return b["attention_mask"].sum(1).tolist(), b["forgery_labels"].tolist()


def measure(batches: list[tuple[list[int], list[int]]]) -> dict:
    """Padding shares and label balance of batches given as (lengths, labels)."""
    out = {"batches": len(batches), "rows": sum(len(l) for l, _ in batches)}
    for name, n in IMAGE_TOKENS.items():
        pad = total = 0
        for lengths, _ in batches:
            width = max(lengths)
            pad += sum(width - t for t in lengths)
            total += len(lengths) * (width + n - 1)
        out[f"padding_{name}"] = pad / total
    mins = [min(sum(lab), len(lab) - sum(lab)) / len(lab) for _, lab in batches]
    out["balance"] = sum(mins) / len(mins)
    out["pure"] = sum(m == 0 for m in mins) / len(mins)
    out["fake_share"] = sum(sum(lab) for _, lab in batches) / out["rows"]
    return out


def random_balance(batch_size: int, p: float) -> dict:
    """Expected label balance of batches drawn independently with fake share p."""
    probs = [math.comb(batch_size, k) * p ** k * (1 - p) ** (batch_size - k) for k in range(batch_size + 1)]
    return {"balance": sum(pr * min(k, batch_size - k) / batch_size for k, pr in enumerate(probs)),
            "pure": probs[0] + probs[-1]}


def stream_epoch(cfg, tokenizer, processor, world: int) -> tuple[list, float]:
    from pipeline.data import make_train_loader

    t0 = time.process_time()
    per_rank = []
    for rank in range(world):
        loader = make_train_loader(cfg, tokenizer, processor, rank=rank, world_size=world, epoch=0)
        per_rank.append([batch_rows(b) for b in loader])
    return per_rank, time.process_time() - t0


def replay(random_rank_batches: list, rank: int, cfg, fake_longer: float) -> list:
    """Group the ungrouped stream of one rank as the stream does (plan.group_window,
    the stream's seeds, windows of consecutive worker batches; one worker), with
    fake lengths scaled by 1 + fake_longer."""
    from pipeline.data.plan import group_window, seeded_rng

    K, B = cfg.group_window, cfg.batch_size
    out = []
    for start in range(0, len(random_rank_batches), K):
        window = random_rank_batches[start:start + K]
        lengths = [round(t * (1 + fake_longer)) if lab else t for ls, labs in window for t, lab in zip(ls, labs)]
        labels = [lab for _, labs in window for lab in labs]
        rng = seeded_rng("group", cfg.seed, 0, rank, 0, start // K)
        for rows in group_window(lengths, labels, B, rng, cfg.group_min_label_share):
            out.append(([lengths[i] for i in rows], [labels[i] for i in rows]))
    return out


# --------------------------------------------------------------------------- report

def fmt(r: dict) -> str:
    return (f"{100 * r['padding_tiny']:.2f}% | {100 * r['padding_paper']:.2f}% | {r['balance']:.3f} | "
            f"{100 * r['pure']:.1f}%")


def mode_name(key: str) -> str:
    if key == "random":
        return "random (`group_by_length: false`)"
    share = float(key)
    what = {0.0: ", by length alone", 0.5: ", even"}.get(share, "")
    default = " (default)" if share == DataConfig.group_min_label_share else ""
    return f"grouped, `group_min_label_share: {share:g}`{what}{default}"


def render(res: dict, args, machine: str) -> str:
    B = args.batch_size
    main = res["main"]
    exp = res["random_expected"]
    lines = [
        "# bench_padding: right padding and label balance, random vs length-grouped batches", "",
        f"Machine: {machine}. Synthetic MMFR, {args.train_images} training images (real LLaVA-CoT answer layout), "
        f"batch {B}, {args.world_size} ranks x 1 loader worker, one epoch ({res['rows']} rows, "
        f"{main['random']['batches']} batches over the ranks), demo BPE tokenizer (vocab {res['vocab']}); row "
        f"lengths {res['length_min']}-{res['length_max']} tokens (mean {res['length_mean_real']:.1f} real, "
        f"{res['length_mean_fake']:.1f} fake). Command: `{res['command']}`.", "",
        "Padding share = padded LLM positions / all positions, the image widened to N tokens per row "
        "(N = 16 tiny, 576 paper). Balance = mean over batches of min(real, fake) / batch size "
        f"(independent draws at this fake share: {exp['balance']:.3f}, label-pure {100 * exp['pure']:.1f}%).", "",
        f"## Real stream, data.group_window={args.default_window}", "",
        "| batches | padding (N=16) | padding (N=576) | balance | label-pure batches | loader CPU s (epoch, ranks) |",
        "|---|---|---|---|---|---|",
    ]
    for key in res["modes"]:
        lines.append(f"| {mode_name(key)} | {fmt(main[key])} | {main[key]['cpu_s']:.1f} |")
    lines += ["", "## Window size (real stream)", "",
              "| data.group_window | batches | padding (N=16) | padding (N=576) | balance | label-pure |",
              "|---|---|---|---|---|---|"]
    for row in res["windows"]:
        lines.append(f"| {row['window']} | {mode_name(row['mode'])} | {fmt(row)} |")
    lines += ["", "## Replay with longer fake answers (same stream, same grouping code and seeds)", "",
              f"Each fake row's length x (1 + share), window {args.default_window}. Share 0 reproduces the "
              f"real stream's rows above exactly: {'yes' if res['replay_matches_stream'] else 'NO'}.", "",
              "| fakes longer by | batches | padding (N=16) | padding (N=576) | balance | label-pure |",
              "|---|---|---|---|---|---|"]
    for row in res["replays"]:
        lines.append(f"| {100 * row['fake_longer']:.0f}% | {mode_name(row['mode'])} | {fmt(row)} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.command = "python benchmarks/bench_padding.py " + " ".join(argv if argv is not None else sys.argv[1:])

    if args.work_dir is None:
        with tempfile.TemporaryDirectory(prefix="bench_padding_") as tmp:
            args.work_dir = tmp
            return run(args)
    os.makedirs(args.work_dir, exist_ok=True)
    return run(args)


def run(args) -> int:
    from modeling.config import ModelConfig
    from modeling.image_processing import ImageProcessor

    train = make_shards(args.work_dir, args.train_images)
    tokenizer, vocab = make_tokenizer(train, args.work_dir)
    processor = ImageProcessor(ModelConfig.preset("tiny"))
    base = DataConfig(train_shards=train, batch_size=args.batch_size, num_workers=0, seed=args.seed,
                      max_length=2048, group_window=args.default_window)
    # A mode is "random" or a group_min_label_share, written with :g.
    modes = ["random"] + [f"{float(x):g}" for x in args.shares.split(",")]

    def cfg_for(mode: str, window: int) -> DataConfig:
        grouping = (dict(group_by_length=False) if mode == "random" else
                    dict(group_by_length=True, group_min_label_share=float(mode)))
        return DataConfig(**{**base.to_dict(), **grouping, "group_window": window}).validate()

    def flat(per_rank):
        return [b for rank in per_rank for b in rank]

    res: dict = {"vocab": vocab, "modes": list(modes), "main": {}, "windows": [], "replays": [],
                 "command": args.command.strip()}
    streams = {}
    for mode in modes:
        per_rank, cpu = stream_epoch(cfg_for(mode, args.default_window), tokenizer, processor, args.world_size)
        streams[mode] = per_rank
        res["main"][mode] = {**measure(flat(per_rank)), "cpu_s": cpu}
        print(f"{mode:>6s} window {args.default_window}: {fmt(res['main'][mode])}", flush=True)
    rows = flat(streams["random"])
    lengths = [(t, lab) for ls, labs in rows for t, lab in zip(ls, labs)]
    res["rows"] = len(lengths)
    res["length_min"], res["length_max"] = min(t for t, _ in lengths), max(t for t, _ in lengths)
    for lab, name in ((0, "real"), (1, "fake")):
        own = [t for t, l in lengths if l == lab]
        res[f"length_mean_{name}"] = sum(own) / len(own)
    res["random_expected"] = random_balance(args.batch_size, res["main"]["random"]["fake_share"])

    sweep = [f"{float(x):g}" for x in args.sweep_shares.split(",")]
    for window in [int(w) for w in args.windows.split(",")]:
        for mode in sweep:
            if window == args.default_window and mode in res["main"]:
                row = res["main"][mode]
            else:
                row = measure(flat(stream_epoch(cfg_for(mode, window), tokenizer, processor,
                                                args.world_size)[0]))
            res["windows"].append({"window": window, "mode": mode, **row})
            print(f"{mode:>6s} window {window}: {fmt(row)}", flush=True)

    # Replays: share 0 must give the stream's own grouped batches (same rows, same order).
    matches = True
    for mode in modes:
        if mode == "random":
            continue
        cfg = cfg_for(mode, args.default_window)
        replayed = [replay(streams["random"][r], r, cfg, 0.0) for r in range(args.world_size)]
        matches &= [[sorted(zip(*b)) for b in rank] for rank in replayed] == \
                   [[sorted(zip(*b)) for b in rank] for rank in streams[mode]]
    res["replay_matches_stream"] = bool(matches)
    for share in [float(s) for s in args.fake_longer.split(",")]:
        rand = [[([round(t * (1 + share)) if lab else t for t, lab in zip(ls, labs)], labs) for ls, labs in rank]
                for rank in streams["random"]]
        res["replays"].append({"fake_longer": share, "mode": "random", **measure(flat(rand))})
        for mode in [m for m in modes if m != "random"]:
            cfg = cfg_for(mode, args.default_window)
            got = flat([replay(streams["random"][r], r, cfg, share) for r in range(args.world_size)])
            res["replays"].append({"fake_longer": share, "mode": mode, **measure(got)})
    for row in res["replays"]:
        print(f"fakes +{100 * row['fake_longer']:.0f}% {row['mode']:>6s}: {fmt(row)}", flush=True)

    print(write_results(args.out, args, res, render))
    return 0 if matches else 1


if __name__ == "__main__":
    sys.exit(main())
