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
# More than one core: one pytest-xdist worker per core. --dist loadfile keeps each test file
# on one worker, so a module's shared VM boots once (not once per worker), and DPDK's and the
# guests' CPU-heavy files spread over the cores. Arguments after ours win (e.g. -n 0).
parallel=()
if [ "$(nproc)" -gt 1 ]; then
    parallel=(-n auto --dist loadfile)
fi
exec python3 -m pytest -p no:cacheprovider -q "${parallel[@]}" "$@"
