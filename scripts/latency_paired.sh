#!/bin/bash
# Extractive query latency of an older tree and this one, alternating, on the same machine:
#   flock /tmp/qaserve-measure.lock scripts/latency_paired.sh /tmp/old-layout $SUBJQA/electronics [ROUNDS]
# OLD is a PYTHONPATH laid out as the package maps it (qaserve = serve + deployments,
# qaserve_client = clients; see drill_writers_paired.sh).
set -u
OLD=${1:?usage: latency_paired.sh OLD_PYTHONPATH DOMAIN_DIR [ROUNDS]}
DATA=${2:?domain folder}
ROUNDS=${3:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
for r in $(seq "$ROUNDS"); do
  echo "old round $r: $(cd /tmp && PYTHONPATH=$OLD "$ROOT/.venv/bin/python" "$ROOT/scripts/query_latency.py" "$DATA" 2>/dev/null)"
  echo "new round $r: $(cd /tmp && "$ROOT/.venv/bin/python" "$ROOT/scripts/query_latency.py" "$DATA" 2>/dev/null)"
done
