"""Cross-dataset benchmark adapters: benchmark layouts -> evaluation shard sets.

Each adapter scans one kind of layout into a `common.BenchmarkScan` and
`common.write_benchmark` writes it as `OUT/<generator>/shard-*.tar` (+
manifest.json, sizes.json) with the MMFR sharder's writer and schema:

- `folder`   (folder.py):  labels from folder names (0_real/1_fake, real/fake, nature/ai);
- `manifest` (listing.py): a CSV/JSONL listing path, label, generator, reasoning;
- `parquet`  (parquet.py): image bytes and labels in parquet files;
- `video`    (video.py):   frames sampled from real/fake video folders (+ Celeb-DF / FF++ split files);
- `loki`     (loki.py):    LOKI's image judgement / multiple-choice annotation files.

`registry.BENCHMARKS` maps benchmark names to an adapter, its options and
presets, and documents their layout; `python -m sharding.eval_sets NAME SRC OUT` (cli.py) runs one.
"""
from .registry import ADAPTERS, BENCHMARKS, Benchmark

__all__ = ["ADAPTERS", "BENCHMARKS", "Benchmark"]
