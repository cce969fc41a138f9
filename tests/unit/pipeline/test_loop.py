"""Loop pieces that need no process group: the finite-loss policy, checkpoint
cadence, resume-invariant dropout seeds, and the per-step metrics.

The "engine" here is a small stand-in with DeepSpeed's engine methods (the
real one is exercised by tests/integration/test_train_deepspeed.py); it lets
a NaN loss be produced on purpose, which a real run cannot do on demand.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from pipeline.training.checkpointing import TrainState
from pipeline.training.loop import (MicroStats, NonFiniteLossError, StepAccumulator, position_seed_part,
                                    rank_seed_part, should_checkpoint, step_metrics, step_seed, train_micro_batch)


# step_seed(1, 3, 1000, 2): changing it changes the dropout masks a resumed run draws.
PINNED_SEED = 4394031912826621923


@dataclass
class Out:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    cpm_loss: torch.Tensor
    cpm_correct: torch.Tensor
    cpm_found: torch.Tensor | None = None


class StandInEngine:
    """Gradient accumulation like DeepSpeed's: a boundary every `accum` micro-steps."""

    def __init__(self, accum: int = 1, nan_on_call: int | None = None, found_from_call: int | None = 1):
        self.w = torch.nn.Parameter(torch.tensor(1.0))
        # From this call on the CPM finds its position in the first sample (None: never).
        self.found_from_call = found_from_call
        self.accum, self.micro_steps, self.calls = accum, 0, 0
        self.nan_on_call = nan_on_call
        self.backward_calls = 0
        self.optimizer = torch.optim.SGD([self.w], lr=0.5)
        # torch's seed at each forward: the dropout seed the loop set for that micro-batch.
        self.seeds: list[int] = []

    def __call__(self, pixel_values, input_ids, attention_mask, labels, forgery_labels):
        self.calls += 1
        self.seeds.append(torch.initial_seed())
        loss = self.w * 2.0
        if self.calls == self.nan_on_call:
            loss = loss * float("nan")
        n = input_ids.shape[0]
        found = self.found_from_call is not None and self.calls >= self.found_from_call
        return Out(loss, loss.detach() * 0.75, loss.detach() * 0.25,
                   torch.tensor([True, False][:n]), torch.tensor([found, False][:n]))

    def is_gradient_accumulation_boundary(self):
        return (self.micro_steps + 1) % self.accum == 0

    def backward(self, loss):
        self.backward_calls += 1
        loss.backward()

    def step(self):
        self.micro_steps += 1

    def get_global_grad_norm(self):
        return 1.5

    def train(self):
        pass


def batch(keys=("k0", "k1")):
    n = len(keys)
    return {"pixel_values": torch.zeros(n, 3, 4, 4), "input_ids": torch.ones(n, 5, dtype=torch.long),
            "attention_mask": torch.ones(n, 5, dtype=torch.long), "labels": torch.ones(n, 5, dtype=torch.long),
            "forgery_labels": torch.tensor([0, 1][:n]), "keys": list(keys), "bad_samples": 0}


def run_one(engine, state, acc, policy="stop"):
    state.batch_in_epoch += 1
    return train_micro_batch(engine, batch(), state, acc, rank=0, seed=1, policy=policy, dtype=torch.float32,
                             image_tokens=16)


def test_boundaries_follow_gradient_accumulation():
    engine, state, acc = StandInEngine(accum=2), TrainState(), StepAccumulator()
    assert [run_one(engine, state, acc) for _ in range(4)] == [False, True, False, True]
    assert engine.backward_calls == 4 and state.samples_seen == 8


def test_nonfinite_loss_stops_naming_step_and_keys():
    engine, state, acc = StandInEngine(accum=1, nan_on_call=3), TrainState(), StepAccumulator()
    run_one(engine, state, acc)
    state.global_step = 1
    run_one(engine, state, acc)
    state.global_step = 2
    with pytest.raises(NonFiniteLossError) as e:
        run_one(engine, state, acc)
    msg = str(e.value)
    assert "optimizer step 3" in msg and "k0" in msg and "k1" in msg and "batch 2" in msg
    assert engine.backward_calls == 2, "no backward pass on a non-finite loss"


def test_nonfinite_loss_skipped_when_configured():
    engine, state, acc = StandInEngine(accum=1, nan_on_call=1), TrainState(), StepAccumulator()
    assert run_one(engine, state, acc, policy="skip") is False
    assert state.skipped_batches == 1 and engine.backward_calls == 0 and state.samples_seen == 0
    assert run_one(engine, state, acc, policy="skip") is True
    assert acc.micro == 1 and all(math.isfinite(v) for v in dataclasses.astuple(acc.sums))
    assert acc.sums.nonfinite == 0 and acc.sums.samples == 2  # the skipped micro-batch added nothing


def test_step_metrics_average_over_micro_batches():
    engine, state, acc = StandInEngine(accum=2), TrainState(), StepAccumulator()
    run_one(engine, state, acc)
    run_one(engine, state, acc)
    m = step_metrics(engine, acc, state, batches_per_epoch=4, world_size=1)
    assert m["train/loss"] == pytest.approx(2.0)
    assert m["train/lm_loss"] == pytest.approx(1.5) and m["train/cpm_loss"] == pytest.approx(0.5)
    assert m["train/cpm_acc"] == pytest.approx(0.5)
    assert m["train/cpm_found_frac"] == pytest.approx(0.5)
    assert m["train/grad_norm"] == 1.5 and m["train/lr"] == 0.5
    assert m["train/epoch"] == pytest.approx(0.5)
    assert m["perf/samples_per_s"] > 0 and m["perf/tokens_per_s"] > m["perf/samples_per_s"]
    assert "memory/rss_gb" in m


def test_checkpoint_cadence():
    assert [s for s in range(1, 11) if should_checkpoint(s, 3, 10)] == [3, 6, 9]
    assert not should_checkpoint(10, 5, 10), "the final save covers the last step"
    assert not any(should_checkpoint(s, 0, 10) for s in range(1, 11))


def test_dropout_seeds_never_collide_over_1024_ranks_and_10000_steps():
    """Every (rank, step, micro-batch) of 1,024 ranks x 10,000 steps x 2 micro-batches
    gets its own seed. The old linear mix gave rank 101 at micro-batch 0 the seed
    of rank 0 at micro-batch 1. The grid is built from the two halves of step_seed,
    spot-checked against step_seed itself."""
    seed, ranks, steps, micros = 3, 1024, 10_000, 2
    rank_part = np.array([rank_seed_part(seed, r) for r in range(ranks)], dtype=np.uint64)
    pos_part = np.array([position_seed_part(seed, t, m) for t in range(steps) for m in range(micros)],
                        dtype=np.uint64)
    grid = rank_part[:, None] ^ pos_part[None, :]  # [rank, step * micros + micro]
    rng = np.random.default_rng(0)
    for r, t, m in zip(rng.integers(ranks, size=200), rng.integers(steps, size=200), rng.integers(micros, size=200)):
        assert step_seed(seed, int(r), int(t), int(m)) == int(grid[r, t * micros + m])
    assert step_seed(seed, 101, 7, 0) != step_seed(seed, 0, 7, 1)
    assert int(grid.max()) < 2**63  # a valid torch.manual_seed
    seeds = np.sort(grid, axis=None)  # flattened; sorting puts equal seeds side by side
    assert seeds.size == ranks * steps * micros and bool(np.all(seeds[1:] != seeds[:-1]))


def test_dropout_seed_is_a_function_of_its_position_only():
    """The same across processes and versions (a stable hash, not Python's hash(),
    which PYTHONHASHSEED changes): a pinned value."""
    assert step_seed(1, 3, 1000, 2) == PINNED_SEED
    assert len({step_seed(s, 0, 0, 0) for s in range(100)}) == 100  # the run's seed matters too


def test_a_resumed_run_uses_the_seeds_of_an_uninterrupted_one():
    """4 steps of 2 micro-batches in one go, or stopped at step 2 and resumed from its
    state: the loop seeds the same micro-batches with the same seeds."""
    from pipeline.training.loop import LoopContext, run_loop

    def ctx(stop=None):
        tracker = types.SimpleNamespace(log=lambda metrics, step: None)
        return LoopContext(make_loader=lambda e, b: [batch() for _ in range(b, 8)], batches_per_epoch=8,
                           total_steps=4, rank=5, world_size=8, seed=11, nonfinite="stop", dtype=torch.float32,
                           image_tokens=16, log_every=1, checkpoint_every=0, save=lambda s: None,
                           tracker=tracker, metrics_file=None, stop_step=stop)

    whole = StandInEngine(accum=2)
    run_loop(whole, TrainState(), ctx())
    first, second = StandInEngine(accum=2), StandInEngine(accum=2)
    state = run_loop(first, TrainState(), ctx(stop=2))
    run_loop(second, dataclasses.replace(state), ctx())
    assert len(whole.seeds) == 8 and first.seeds + second.seeds == whole.seeds
    assert whole.seeds[2] == step_seed(11, 5, 1, 0) and len(set(whole.seeds)) == 8


def test_resume_at_the_last_step_trains_nothing_and_saves_in_the_new_folder(tmp_path):
    """A run resumed with max_steps equal to the checkpoint's step (e.g. to turn a
    universal checkpoint into an ordinary one on the new number of ranks) opens no
    loader, takes no step and saves nothing mid-loop; the final save then writes
    that step's tag into its own checkpoint folder (unless it is already there)."""
    from pipeline.training import checkpointing as ckpt
    from pipeline.training.loop import LoopContext, run_loop

    class Engine(StandInEngine):
        def train(self):
            pass


    opened, saved, logged = [], [], []
    tracker = types.SimpleNamespace(log=lambda metrics, step: logged.append(step))
    ctx = LoopContext(make_loader=lambda e, b: opened.append((e, b)) or [batch()], batches_per_epoch=3,
                      total_steps=4, rank=0, world_size=1, seed=1, nonfinite="stop", dtype=torch.float32,
                      image_tokens=16, log_every=1, checkpoint_every=2, save=saved.append, tracker=tracker,
                      metrics_file=None)
    engine = Engine()
    state = TrainState(global_step=4, epoch=1, batch_in_epoch=1, samples_seen=8)
    before = dataclasses.replace(state)
    assert run_loop(engine, state, ctx) == before
    assert (opened, saved, logged, engine.calls) == ([], [], [], 0)
    new_dir = tmp_path / "one-rank" / "checkpoints"
    assert ckpt.needs_final_save(str(new_dir), 4, save_final=True)
    assert not ckpt.needs_final_save(str(new_dir), 4, save_final=False)
    os.makedirs(new_dir / "global_step4")
    ckpt.mark_complete(str(new_dir), "global_step4", state)
    assert not ckpt.needs_final_save(str(new_dir), 4, save_final=True)
    # One step short: the loop does train.
    run_loop(engine, TrainState(global_step=3), ctx)
    assert opened == [(0, 0)] and engine.calls == 1 and logged == [4]
    assert saved == []  # the last step's checkpoint is the final save's


def _cpm_loop(engine, steps: int, abort_after: int):

    from pipeline.training.loop import CpmWatch, LoopContext

    tracker = types.SimpleNamespace(log=lambda metrics, step: None)
    return LoopContext(make_loader=lambda e, b: [batch((f"e{e}b{i}", f"e{e}b{i}x")) for i in range(b, 100)],
                       batches_per_epoch=100, total_steps=steps, rank=0, world_size=1, seed=1, nonfinite="stop",
                       dtype=torch.float32, image_tokens=16, log_every=1, checkpoint_every=0, save=lambda s: None,
                       tracker=tracker, metrics_file=None,
                       cpm_watch=CpmWatch(enabled=True, prefix="<CONCLUSION> This image is",
                                          abort_after_steps=abort_after))


def test_a_step_without_cpm_position_warns_with_its_keys(caplog):
    from pipeline.training.loop import run_loop

    engine = StandInEngine(found_from_call=3)
    with caplog.at_level("WARNING", logger="pipeline.training.loop"):
        run_loop(engine, TrainState(), _cpm_loop(engine, steps=4, abort_after=3))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2  # steps 1 and 2; found from step 3 on, so no stop
    assert "step 1: no sample of the batch has a CPM position" in warnings[0]
    assert "'<CONCLUSION> This image is' followed by real/fake" in warnings[0]
    assert "e0b0" in warnings[0] and "e0b1" in warnings[1]


def test_the_run_stops_when_its_first_steps_never_find_the_cpm():
    from pipeline.training.loop import CpmNotFoundError, run_loop

    engine = StandInEngine(found_from_call=None)
    state = TrainState()
    with pytest.raises(CpmNotFoundError, match=r"first 3 optimizer steps .*'<CONCLUSION> This image is'"):
        run_loop(engine, state, _cpm_loop(engine, steps=10, abort_after=3))
    assert state.global_step == 3
    # 0 disables the stop (the warnings remain).
    engine = StandInEngine(found_from_call=None)
    assert run_loop(engine, TrainState(), _cpm_loop(engine, steps=5, abort_after=0)).global_step == 5


def padded_batch():
    """Two samples of 5 and 3 real tokens right-padded to 5 (the image placeholder is one of them)."""
    b = batch()
    b["attention_mask"] = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return b


def test_perf_metrics_count_real_positions_padding_and_loader_wait():
    """Two micro-batches: LLM lengths 5-1+16 = 20 and 3-1+16 = 18 each; 2 x 20 positions
    with padding; the loader waits are averaged over ranks (here 2, as if the all-reduced
    sums came from two ranks with the same batches) and divided by the step time."""
    from modeling.costs.flops import StepFlops
    from pipeline.training.loop import micro_stats

    engine, state, acc = StandInEngine(accum=2), TrainState(), StepAccumulator()
    out = engine(**{k: padded_batch()[k] for k in ("pixel_values", "input_ids", "attention_mask", "labels",
                                                   "forgery_labels")})
    for wait in (0.25, 0.75):
        one_rank = micro_stats(out, padded_batch(), image_tokens=16, data_wait_s=wait)
        assert MicroStats.from_tensor(one_rank.to_tensor()) == one_rank
        acc.add(one_rank + one_rank)  # the all-reduce sum over two identical ranks
    acc.started -= 10.0  # a 10 s step (plus the few microseconds this test takes)
    flops = StepFlops(per_sample=1e12, per_token=1e11, per_token_pair=1e9)
    m = step_metrics(engine, acc, state, batches_per_epoch=4, world_size=2, flops=flops, peak_flops=2e12)
    samples, tokens, tokens_sq = 8, 4 * (20 + 18), 4 * (20 ** 2 + 18 ** 2)
    assert m["perf/padding_frac"] == pytest.approx(1 - (20 + 18) / 40)
    assert m["perf/tokens_per_s"] == pytest.approx(tokens / 10, rel=1e-3)
    step_flops = 1e12 * samples + 1e11 * tokens + 1e9 * tokens_sq
    assert m["perf/model_tflops_per_s"] == pytest.approx(step_flops / 2 / 10 / 1e12, rel=1e-3)
    assert m["perf/mfu"] == pytest.approx(step_flops / (10 * 2 * 2e12), rel=1e-3)
    # Each rank waited 0.25 + 0.75 s of the 10 s step.
    assert m["perf/data_wait_frac"] == pytest.approx(1.0 / 10, rel=1e-3)
    # No peak (CPU): no perf/mfu at all (never a NaN), the achieved FLOP/s still logged.
    m = step_metrics(engine, acc, state, batches_per_epoch=4, world_size=2, flops=flops, peak_flops=None)
    assert "perf/mfu" not in m and m["perf/model_tflops_per_s"] > 0
    assert "perf/model_tflops_per_s" not in step_metrics(engine, acc, state, batches_per_epoch=4, world_size=2)


def test_loop_measures_the_loader_wait_and_prints_the_metrics(tmp_path):
    """A loader that sleeps before each batch: the wait it reports is at least the
    sleep, and the progress line, metrics.jsonl and the tracker carry the new metrics."""
    import json
    import time

    from modeling.costs.flops import StepFlops
    from pipeline.training.loop import LoopContext, run_loop

    def slow_loader(epoch, start):
        for _ in range(start, 4):
            time.sleep(0.05)
            yield padded_batch()

    class Progress:
        def __init__(self):
            self.lines = []

        def update(self, n):
            pass

        def set_postfix_str(self, text, refresh=False):
            self.lines.append(text)

    logged = []
    tracker = types.SimpleNamespace(log=lambda metrics, step: logged.append(metrics))
    progress = Progress()
    ctx = LoopContext(make_loader=slow_loader, batches_per_epoch=4, total_steps=2, rank=0, world_size=1, seed=1,
                      nonfinite="stop", dtype=torch.float32, image_tokens=16, log_every=1, checkpoint_every=0,
                      save=lambda s: None, tracker=tracker, metrics_file=str(tmp_path / "metrics.jsonl"),
                      progress=progress, flops=StepFlops(1e6, 1e5, 1e3), peak_flops=1e9)
    run_loop(StandInEngine(accum=2), TrainState(), ctx)
    assert len(logged) == 2
    for m in logged:
        assert m["perf/data_wait_frac"] * m["perf/step_time_s"] >= 2 * 0.05  # two micro-batches of 50 ms
        assert 0 < m["perf/data_wait_frac"] <= 1
        assert m["perf/padding_frac"] == pytest.approx(0.05) and 0 < m["perf/mfu"]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all({"perf/mfu", "perf/padding_frac", "perf/data_wait_frac", "perf/model_tflops_per_s"} <= set(r)
               for r in rows)
    assert len(progress.lines) == 2
    assert "mfu " in progress.lines[0] and "pad 5%" in progress.lines[0] and "wait " in progress.lines[0]


def test_device_peak_comes_from_the_config_or_the_gpu_table():
    from pipeline.training.loop import device_peak_flops

    assert device_peak_flops(400.0, "auto")[0] == 400e12
    peak, why = device_peak_flops(None, "H100")
    assert peak == 989e12 and "H100" in why
    peak, why = device_peak_flops(None, "auto", torch.device("cpu"))
    assert peak is None and "perf.peak_tflops" in why


def test_perf_config_is_validated_naming_the_field():
    from pathlib import Path

    from pipeline.training.config import TrainConfigError, load_train_config

    tiny = str(Path(__file__).resolve().parents[3] / "launch" / "recipes" / "tiny-cpu.yaml")
    assert load_train_config(tiny).perf.gpu == "auto" and load_train_config(tiny).perf.peak_tflops is None
    assert load_train_config(tiny, ["perf.gpu=A100"]).perf.gpu == "A100"
    assert load_train_config(tiny, ["perf.peak_tflops=989"]).perf.peak_tflops == 989.0
    with pytest.raises(TrainConfigError, match=r"perf\.peak_tflops: must be a finite number"):
        load_train_config(tiny, ["perf.peak_tflops=0"])
    with pytest.raises(TrainConfigError, match=r"perf\.gpu='B9000': must be one of \['auto', 'B200'"):
        load_train_config(tiny, ["perf.gpu=B9000"])


def test_a_stop_request_ends_the_loop_after_the_step_it_arrived_in():
    """The request read at a micro-batch travels in that micro-batch's stats; the
    loop finishes the optimizer step (both micro-batches) and leaves after it,
    with the periodic save of that step still made."""
    from pipeline.training.loop import LoopContext, run_loop

    calls = {"n": 0}

    def requested() -> bool:  # true from the 5th micro-batch on: step 3's first one
        calls["n"] += 1
        return calls["n"] >= 5

    saved, logged = [], []
    tracker = types.SimpleNamespace(log=lambda metrics, step: logged.append(step))
    ctx = LoopContext(make_loader=lambda e, b: [batch() for _ in range(b, 40)], batches_per_epoch=40,
                      total_steps=10, rank=0, world_size=1, seed=1, nonfinite="stop", dtype=torch.float32,
                      image_tokens=16, log_every=1, checkpoint_every=3, save=lambda s: saved.append(s.global_step),
                      tracker=tracker, metrics_file=None, stop_requested=requested)
    state = run_loop(StandInEngine(accum=2), TrainState(), ctx)
    assert state.global_step == 3 and state.batch_in_epoch == 6
    assert logged == [1, 2, 3] and saved == [3]
    # Without a request the same loop runs to the end.
    state = run_loop(StandInEngine(accum=2), TrainState(), dataclasses.replace(ctx, stop_requested=lambda: False))
    assert state.global_step == 10
