#!/usr/bin/env bash
# One command: set up ./.venv, write sample photos to ./demo/images, extract them with a local
# Ray instance to ./demo/output. Extra arguments go to jobs/extract.py (e.g. --model resnet34).
set -euo pipefail
cd "$(dirname "$0")/.."
bash jobs/bootstrap.sh
exec .venv/bin/python jobs/extract.py --demo "$@"
