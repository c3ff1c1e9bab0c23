#!/usr/bin/env bash
# One command: set up ./.venv and run the whole test suite (what .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."
bash jobs/bootstrap.sh
.venv/bin/python -m ruff check resnet_features jobs tests benchmarks
.venv/bin/lint-imports  # the package's layers (pyproject.toml [tool.importlinter])
exec .venv/bin/python -m pytest -v --durations=15 "$@"
