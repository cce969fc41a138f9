#!/usr/bin/env bash
# GPU check of the paper-shape model (random weights): training micro-step time with
# sdpa and, when flash-attn imports, flash_attention_2; peak memory next to the plan's
# prediction for it (--check --plan's formulas); MFU; generation tokens/s at batch 16. Writes JSON under benchmarks/results/ and prints a table.
#
#   bash benchmarks/gpu_check.sh                                  # paper preset, one GPU (< 8 min on H100/H200)
#   bash benchmarks/gpu_check.sh --preset tiny --device cpu --out /tmp/gc.json   # CPU smoke mode (the tests)
#   bash benchmarks/gpu_check.sh --help                           # every option of benchmarks/gpu_check.py
#
# Environment: PYTHON (default: the checkout's .venv/bin/python if present, else python3);
# GPU_CHECK_BUDGET_S (default 420): phases that would start later are skipped, and the
# whole run is killed GPU_CHECK_GRACE_S (default 60) seconds after the budget.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
budget="${GPU_CHECK_BUDGET_S:-420}"
grace="${GPU_CHECK_GRACE_S:-60}"

for arg in "$@"; do
    if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
        sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        echo
        exec "$PYTHON" "$here/gpu_check.py" --help
    fi
done

cd "$repo"
# --budget-s first: a --budget-s among "$@" overrides it (argparse keeps the last).
status=0
timeout --kill-after=10 "$((${budget%.*} + grace))" "$PYTHON" "$here/gpu_check.py" --budget-s "$budget" "$@" || status=$?
if [[ $status -eq 124 || $status -eq 137 ]]; then
    echo "gpu_check.sh: stopped after $((${budget%.*} + grace)) s; the JSON keeps the phases that finished" >&2
fi
exit "$status"
