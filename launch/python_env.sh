# Sourced by the launch/*.sh wrappers: picks the interpreter and import path.
# Uses the checkout's .venv/bin/python when it exists (what `make` creates),
# otherwise the python on PATH; puts the checkout first on PYTHONPATH so the
# packages import from this tree even without `pip install -e .`.
# Sets: repo (the checkout's root) and py (the interpreter).
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$repo/.venv/bin/python" ]]; then
  py="$repo/.venv/bin/python"
else
  py="$(command -v python3 || command -v python)"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
