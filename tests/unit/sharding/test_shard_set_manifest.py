"""Shard planning (interleave, limits, warnings), manifests and sizes.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the helper importable
from _shard_fixtures import image_bytes, make_mmfr, record, rewrite_json, tree_bytes, write  # noqa: E402
from sharding import manifest as mf  # noqa: E402
from sharding.mmfr import scan_mmfr  # noqa: E402
from sharding.shard_set import (OptionsMismatch, SetSpec, ShardOptions, plan_set,  # noqa: E402
                                plan_warnings, write_shard_set, write_shard_sets)
from sharding.tar_writer import Rejection, ShardResult, ShardSample  # noqa: E402


def _fake_samples(n_fake: int, n_real: int, size: int = 1000) -> list[ShardSample]:
    out = []
    for i in range(n_fake + n_real):
        label = 1 if i < n_fake else 0
        source = "diffusiondb" if label else "laion"
        meta = {"label": label, "source": source, "relpath": f"{source}/{i}.png"}
        out.append(ShardSample(f"k{i}", f"{source}/{i:04d}.png", None, meta, size))
    return out


def test_interleave_no_single_label_shard_and_seeded():
    samples = _fake_samples(45, 15)
    opts = ShardOptions(max_samples_per_shard=8, seed=3)
    shards = plan_set("train", samples, opts)
    assert sum(len(s) for s in shards) == 60 and len(shards) == 8
    assert sorted(s.key for sh in shards for s in sh) == sorted(s.key for s in samples)
    for sh in shards:
        assert {s.metadata["label"] for s in sh} == {0, 1}
    again = plan_set("train", list(reversed(samples)), opts)  # input order does not matter
    assert [[s.key for s in sh] for sh in again] == [[s.key for s in sh] for sh in shards]
    other = plan_set("train", samples, ShardOptions(max_samples_per_shard=8, seed=4))
    assert [[s.key for s in sh] for sh in other] != [[s.key for s in sh] for sh in shards]
    assert not [w for w in plan_warnings("train", shards, opts) if "single label" in w]


def test_byte_limit_and_plan_warning():
    samples = _fake_samples(5, 5, size=10_000)
    shards = plan_set("train", samples, ShardOptions(max_bytes_per_shard=35_000))
    assert all(len(sh) <= 3 for sh in shards) and sum(map(len, shards)) == 10
    big = plan_set("train", _fake_samples(1, 0, size=10 ** 6), ShardOptions(max_bytes_per_shard=1000))
    assert [len(s) for s in big] == [1]  # an oversized sample still gets its own shard
    warns = plan_warnings("eval/flux", shards, ShardOptions(plan_ranks=4, plan_workers=2))
    assert any("< --plan-ranks x --plan-workers = 8" in w for w in warns)
    one_label = plan_warnings("t", [[s] for s in samples[:2]] + [[samples[4], samples[5]]], ShardOptions())
    assert sum("single label" in w for w in one_label) == 2


def test_manifest_reconciles_or_raises():
    res = ShardResult("train", 0, "shard-000000.tar", samples=2, bytes=10240, sha256="ab", inputs=3,
                      rejected=[{"path": "p", "reason": "truncated", "detail": "", "kind": "image"}],
                      counts={"label": {"1": 2}, "generator_label": {"flux:1": 2}})
    m = mf.build_manifest("train", [res], [Rejection("q", "missing"), Rejection("f.json", "malformed_json",
                                                                                  kind="file")], {"a": 1})
    assert m["inputs"] == {"images_seen": 4, "written": 2, "rejected": 2}
    assert m["rejected_by_reason"] == {"malformed_json": 1, "missing": 1, "truncated": 1}
    assert m["counts"]["by_generator_label"] == {"flux": {"1": 2}}
    assert mf.sizes_of(m) == {"shard-000000.tar": 2}
    res.inputs = 4  # one input unaccounted for
    with pytest.raises(mf.ReconciliationError):
        mf.build_manifest("train", [res], [], {})


def test_write_shard_sets_manifest_and_sizes(tmp_path):
    make_mmfr(tmp_path / "mmfr", n_train=6, gens=("flux",), n_eval=3)
    write(tmp_path / "mmfr/laion/00000/broken.jpg", image_bytes("JPEG")[:-30])  # truncated
    rewrite_json(tmp_path / "mmfr", "forgery_reasoning_cot.json",
                 lambda recs: recs + [record("b", "laion/00000/broken.jpg", 0)])
    scan = scan_mmfr(str(tmp_path / "mmfr"))
    sets = {n: SetSpec(s, scan.rejected.get(n, [])) for n, s in scan.samples.items()}
    opts = ShardOptions(max_samples_per_shard=5, progress=False, plan_ranks=2, plan_workers=2)
    summary = write_shard_sets(sets, str(tmp_path / "out"), opts)
    train = mf.load_manifest(str(tmp_path / "out/train"))
    assert train["totals"]["samples"] == 12 and train["totals"]["shards"] == 3
    assert train["inputs"] == {"images_seen": 13, "written": 12, "rejected": 1}
    assert [(r["path"], r["reason"]) for r in train["rejected"]] == [("laion/00000/broken.jpg", "truncated")]
    assert train["counts"]["by_label"] == {"0": 6, "1": 6}
    assert train["arguments"] == opts.output_arguments() and "workers" not in train["arguments"]
    sizes = json.loads((tmp_path / "out/train/sizes.json").read_text())
    assert sizes == {s["name"]: s["samples"] for s in train["shards"]}
    flux = summary.manifests["eval/flux"]
    assert flux["counts"]["by_generator_label"] == {"flux": {"0": 3, "1": 3}}
    assert any("--plan-ranks" in w for w in flux["warnings"])


@pytest.mark.slow
def test_output_independent_of_worker_count(tmp_path):
    make_mmfr(tmp_path / "mmfr", n_train=8, gens=("flux", "gpt4o"), n_eval=2)
    scan = scan_mmfr(str(tmp_path / "mmfr"))
    sets = {n: SetSpec(s, scan.rejected.get(n, [])) for n, s in scan.samples.items()}
    for w in (1, 2):
        write_shard_sets(sets, str(tmp_path / f"out{w}"), ShardOptions(max_samples_per_shard=3, workers=w,
                                                                        progress=False))
    assert tree_bytes(tmp_path / "out1") == tree_bytes(tmp_path / "out2")


def test_rerun_with_other_options_is_refused(tmp_path):
    samples = _fake_samples(0, 0)
    write_shard_set(samples, str(tmp_path / "o"), ShardOptions(progress=False))
    write_shard_set(samples, str(tmp_path / "o"), ShardOptions(progress=False, workers=2))  # fine
    with pytest.raises(OptionsMismatch, match="seed: was 0, now 5"):
        write_shard_set(samples, str(tmp_path / "o"), ShardOptions(progress=False, seed=5))
