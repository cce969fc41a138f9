#!/usr/bin/env bash
# Shard a released MMFR dataset into WebDataset tar shard sets.
#   bash launch/shard_mmfr.sh MMFR_ROOT OUT_DIR [options]    (--help for the options)
# Thin wrapper over `python -m sharding.shard_mmfr` (interpreter: launch/python_env.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python_env.sh"
exec "$py" -m sharding.shard_mmfr "$@"
