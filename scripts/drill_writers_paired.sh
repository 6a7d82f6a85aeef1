#!/bin/bash
# The writers drill against an older tree and this one, alternating, on the same machine:
#   git archive dcea3c6 | tar -x -C /tmp/old-src   # then lay it out as the package maps it:
#   /tmp/old/qaserve = serve + deployments (as qaserve/deployments), /tmp/old/qaserve_client = clients
#   flock /tmp/qaserve-measure.lock scripts/drill_writers_paired.sh /tmp/old [ROUNDS]
# Each run: a fresh data dir, `qaserve serve` (local.yaml) until "serving on", then
# `qaserve drill writers` (8 writers x 5 batches x 20 reviews), then the server is stopped.
set -u
OLD=${1:?usage: drill_writers_paired.sh OLD_PYTHONPATH [ROUNDS]}
ROUNDS=${2:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=$ROOT/.venv/bin/python
run() {  # name, PYTHONPATH ('' = this tree), round
  D=$(mktemp -d /tmp/drill-data.XXXX); PORT=${PORT:-8741}; LOG=$D.serve.log
  if [ -n "$2" ]; then (cd /tmp && PYTHONPATH=$2 setsid "$PY" -m qaserve.cli serve --port "$PORT" --data-dir "$D" >"$LOG" 2>&1 &)
  else (cd /tmp && setsid "$PY" -m qaserve.cli serve --port "$PORT" --data-dir "$D" >"$LOG" 2>&1 &); fi
  for _ in $(seq 900); do grep -q "serving on" "$LOG" && break; sleep 1; done
  sleep 3
  echo "== $1 round $3"
  "$PY" -m qaserve.cli drill writers --url "http://127.0.0.1:$PORT" | grep -E '"(median_s|p95_s|max_s|docs_per_s|acked_present)"'
  pkill -TERM -f "serve --port $PORT --data-dir $D"; sleep 12
  # Ray workers sit in their own process groups: this kills every Ray worker on the machine.
  pkill -9 -f "serve --port $PORT --data-dir $D"; pkill -9 -f "ray::"; sleep 3
  rm -rf "$D" "$LOG"
}
for r in $(seq "$ROUNDS"); do run old "$OLD" "$r"; run new '' "$r"; done
