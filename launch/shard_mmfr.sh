#!/usr/bin/env bash
# Shard a released MMFR dataset into WebDataset tar shard sets.
#   bash launch/shard_mmfr.sh MMFR_ROOT OUT_DIR [options]    (--help for the options)
# Thin wrapper: uses the checkout's .venv/bin/python when it exists, otherwise
# the python on PATH, and runs `python -m sharding.shard_mmfr` from the checkout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$here/.venv/bin/python" ]]; then
  py="$here/.venv/bin/python"
else
  py="$(command -v python3 || command -v python)"
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m sharding.shard_mmfr "$@"
