#!/usr/bin/env bash
# The README's main-job command: install what is missing, then run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m host.cli demo "$@"
