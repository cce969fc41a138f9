"""Grow MMFR: reasoning annotations for new generators (`fakereasoning-annotate`).

Three steps, each a subcommand of `python -m sharding.annotate`:

- `requests` (requests.py): a folder of images -> request files in the OpenAI
  Batch JSONL format, plus an index (custom_id -> image) that `collect` reads.
  The same files run on the OpenAI Batch API, on `vllm run-batch`, or through
- `run` (direct.py): any OpenAI-compatible server, with a concurrency limit,
  retries, a timeout per request and a resumable journal in the Batch output
  format.
- `collect` (collect.py): Batch output files and journals -> the MMFR layout
  that `python -m sharding.shard_mmfr` reads, and a report of every answer
  kept or rejected (answers.py parses answers as strict JSON, never evaluated).

Like the rest of `sharding/`, this package imports nothing from `modeling/`
or `pipeline/`.
"""
