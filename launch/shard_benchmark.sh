#!/usr/bin/env bash
# Shard a cross-dataset benchmark into evaluation shard sets OUT/<generator>/.
#   bash launch/shard_benchmark.sh NAME SRC OUT [options]   (--help for options, --list for layouts)
# NAME: genimage, chameleon, universalfakedetect, community-forensics-eval, celeb-df, ffpp,
# or an adapter (folder, manifest, parquet, video) for any other dataset.
# Thin wrapper: uses the checkout's .venv/bin/python when it exists, otherwise
# the python on PATH, and runs `python -m sharding.benchmarks` from the checkout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$here/.venv/bin/python" ]]; then
  py="$here/.venv/bin/python"
else
  py="$(command -v python3 || command -v python)"
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m sharding.benchmarks "$@"
