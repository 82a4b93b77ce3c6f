#!/usr/bin/env bash
# Coverage-guided fuzzing of vdev's trust boundaries (atheris/libFuzzer), one table row per
# target: executions, coverage, crashes, hangs, leaks.  See fuzz/__init__.py.
#   bash scripts/fuzz.sh [TARGET] [--runs N] [--max-time S] [--no-sanitize] [--keep]
# Long campaigns share the machine: nice -n 10 bash scripts/fuzz.sh --runs 1000000
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import atheris" 2>/dev/null; then
    echo "fuzz: atheris is missing (pip install atheris, or scripts/setup.sh)" >&2
    exit 2
fi
exec python3 -m fuzz.campaign "$@"
