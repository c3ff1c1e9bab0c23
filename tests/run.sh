#!/usr/bin/env bash
# One command: set up ./.venv and run the test suite (what .ci/run calls: the whole suite).
#   bash tests/run.sh            the whole suite
#   bash tests/run.sh --fast     everything but the end-to-end tier (-m "not slow": no Ray job,
#                                no `ray job submit`, no job subprocess)
# Any other arguments go to pytest (e.g. `bash tests/run.sh --fast -k s3`).
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
for a in "$@"; do
  if [ "$a" = "--fast" ]; then
    args+=(-m "not slow")
  else
    args+=("$a")
  fi
done
bash jobs/bootstrap.sh
.venv/bin/python -m ruff check resnet_features jobs tests benchmarks
.venv/bin/lint-imports  # the package's layers (pyproject.toml [tool.importlinter])
exec .venv/bin/python -m pytest -v --durations=15 ${args[@]+"${args[@]}"}
