#!/usr/bin/env bash
# Nightly run: `bash jobs/nightly.sh INPUT OUTPUT [extra extract.py flags]`.
# Run id = today's UTC date (override with RUN_ID=...), --incremental: only new and changed
# images are computed. Safe to rerun: a crashed run resumes from its committed parts, a finished
# one is a no-op. Works locally or under `ray job submit --working-dir . -- bash jobs/nightly.sh`.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash jobs/nightly.sh INPUT OUTPUT [extract.py flags...]" >&2
  exit 2
fi
input=$1 output=$2
shift 2
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" jobs/extract.py --input "$input" --output "$output" \
  --run-id "${RUN_ID:-$(date -u +%F)}" --incremental "$@"
