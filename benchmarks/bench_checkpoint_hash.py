"""Save-time cost of hashing checkpoint files while they are written (issue 25, item 3).

DeepSpeed's TorchCheckpointEngine (`torch.save` to a path) against the engine the
pipeline uses (pipeline/distributed/engine.py: the same `torch.save` through a
file object that feeds sha256), on the same state dicts in the same run:

1. the tiny preset's model state plus AdamW-like fp32 master/moment copies (what
   one rank of the tiny runs saves);
2. a large payload (--large-mb of bf16 tensors in 64 MB pieces), from which the
   per-byte cost is projected to one rank's share of a 13B checkpoint (ZeRO-3
   over --ranks ranks: bf16 weights of all parameters, fp32 master and two AdamW
   moments of the trainable ones).

Also timed: reading a file back to hash it (what a second pass would cost).
Prints ratios (hashing / plain) per case; medians of --repeats saves each.

    PYTHONPATH=. python benchmarks/bench_checkpoint_hash.py [--large-mb 512] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def tiny_rank_state() -> dict:
    from modeling.config import ModelConfig
    from modeling.model import FakeReasoningModel
    from modeling.tokenization.tokenizer import build_bpe_tokenizer, demo_corpus
    from sharding.schema import ATTRIBUTES, EVAL_QUESTION

    with tempfile.TemporaryDirectory() as d:
        tok = build_bpe_tokenizer(demo_corpus(ATTRIBUTES, [EVAL_QUESTION]), d, vocab_size=600)
        model = FakeReasoningModel.from_config(ModelConfig.preset("tiny"), tok)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optim = {f"{k}.{slot}": v.float().clone() for k, v in weights.items() if v.is_floating_point()
             for slot in ("master", "exp_avg", "exp_avg_sq")}
    return {"module": weights, "optimizer": optim}


def large_state(mb: int) -> dict:
    piece = 64 << 20
    return {f"w{i}": torch.randn(piece // 2).to(torch.bfloat16) for i in range(max(1, (mb << 20) // piece))}


def nbytes(state) -> int:
    if isinstance(state, dict):
        return sum(nbytes(v) for v in state.values())
    return state.numel() * state.element_size() if torch.is_tensor(state) else 0


def time_saves(engine, state, folder: str, repeats: int) -> float:
    times = []
    for i in range(repeats):
        path = os.path.join(folder, f"f{i}.pt")
        t0 = time.perf_counter()
        engine.save(state, path)
        times.append(time.perf_counter() - t0)
        os.remove(path)
    return statistics.median(times)


def time_readback_hash(engine, state, folder: str) -> float:
    from sharding.shard_set import file_digest

    path = os.path.join(folder, "readback.pt")
    engine.save(state, path)
    t0 = time.perf_counter()
    file_digest(path)
    seconds = time.perf_counter() - t0
    os.remove(path)
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--large-mb", type=int, default=512, help="size of the large payload (default 512)")
    p.add_argument("--repeats", type=int, default=3, help="saves per case; the median is reported (default 3)")
    p.add_argument("--dir", default=None, help="folder to save into (default: a temporary folder)")
    p.add_argument("--ranks", type=int, default=8, help="ranks of the projected 13B run (default 8)")
    p.add_argument("--params-13b", type=float, default=13.6e9, help="parameters of the 13B model (all towers)")
    p.add_argument("--trainable-13b", type=float, default=0.5e9,
                   help="trainable parameters of the 13B recipe (LoRA + projector + fusion + CPM; an assumption)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from pipeline.distributed.engine import _hashing_engine_class

    plain, hashing = TorchCheckpointEngine(None), _hashing_engine_class()(None)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for name, state in (("tiny preset, one rank", tiny_rank_state()), (f"{args.large_mb} MB bf16", large_state(args.large_mb))):
            size = nbytes(state)
            # Alternate so that page-cache state and disk load treat both alike.
            t_plain = time_saves(plain, state, folder, args.repeats)
            t_hash = time_saves(hashing, state, folder, args.repeats)
            t_back = time_readback_hash(plain, state, folder)
            rows.append((name, size, t_plain, t_hash, t_back))
    print(f"{'case':<24} {'MB':>8} {'plain s':>9} {'hashing s':>10} {'ratio':>7} {'read-back hash s':>17}")
    for name, size, t_plain, t_hash, t_back in rows:
        print(f"{name:<24} {size / 2**20:>8.1f} {t_plain:>9.3f} {t_hash:>10.3f} {t_hash / t_plain:>7.3f} {t_back:>17.3f}")
    name, size, t_plain, t_hash, t_back = rows[-1]
    per_byte_extra = max(0.0, t_hash - t_plain) / size
    rank_bytes = (args.params_13b * 2 + args.trainable_13b * 12) / args.ranks
    print(f"13B projection: {rank_bytes / 2**30:.1f} GiB per rank over {args.ranks} ranks "
          f"(bf16 weights of {args.params_13b:.3g} params, fp32 master + 2 moments of {args.trainable_13b:.3g}): "
          f"plain save {t_plain / size * rank_bytes:.1f} s, hashing adds {per_byte_extra * rank_bytes:.1f} s "
          f"(ratio {t_hash / t_plain:.3f}); a read-back second pass would add {t_back / size * rank_bytes:.1f} s "
          f"(at this machine's speeds, one core, page cache warm)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
