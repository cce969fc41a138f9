#!/usr/bin/env bash
# Shard a cross-dataset benchmark into evaluation shard sets OUT/<generator>/.
#   bash launch/shard_benchmark.sh NAME SRC OUT [options]   (--help for options, --list for layouts)
# NAME: genimage, chameleon, universalfakedetect, community-forensics-eval, celeb-df, ffpp
# (--preset c40 for the LQ level), loki, bfree, bfree-viral,
# or an adapter (folder, manifest, parquet, video, loki) for any other dataset.
# Thin wrapper over `python -m sharding.eval_sets` (interpreter: launch/python_env.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python_env.sh"
exec "$py" -m sharding.eval_sets "$@"
