#!/usr/bin/env bash
# The README's test command: install what is missing, lint, type-check, run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
python3 -m ruff check .
python3 -m ruff format --check .
echo "== mypy"
python3 -m mypy
echo "== pytest"
exec python3 -m pytest -p no:cacheprovider -q "$@"
