#!/usr/bin/env bash
# Check that new tests kill mutmut's survivors, quickly: for each mutant named on stdin,
# apply it to this tree (mutmut apply), run the given tests with -x, restore vdev/ from git.
#
#   python3 tools/mutmut_score.py survivors MODULE | awk '{print $2}' |
#       bash tools/mutmut_confirm.sh tests/skywalk/test_ring_index_rules.py
#
# Prints KILLED (with the first failing test) or SURVIVED per mutant.  Refuses to run with
# uncommitted changes under vdev/ (it restores vdev/ with git checkout).  Never run it while
# a mutmut run is generating mutants: mutmut would copy the applied mutant into mutants/ as
# if it were the source (this happened once; rm mutants/<file>* and rerun to recover).
set -uo pipefail
cd "$(dirname "$0")/.."
if pgrep -f "mutmut run" >/dev/null; then
    echo "a mutmut run is active: wait for it (it copies vdev/ while generating)" >&2
    exit 2
fi
if ! git diff --quiet -- vdev; then
    echo "uncommitted changes under vdev/: commit or stash them first" >&2
    exit 2
fi
export PYTHONPATH="$PWD" CI=1
out=$(mktemp)
trap 'git checkout -q -- vdev; rm -f "$out"' EXIT
while read -r name; do
    [ -z "$name" ] && continue
    if ! timeout 120 python3 -m mutmut apply "$name" >/dev/null 2>&1 || git diff --quiet -- vdev; then
        echo "NOT APPLIED $name"
        continue
    fi
    if timeout 600 nice -n 15 python3 -m pytest -q -x -p no:cacheprovider "$@" >"$out" 2>&1; then
        echo "SURVIVED $name"
    else
        echo "KILLED   $name  $(grep -m1 -E '^(FAILED|ERROR) ' "$out" | cut -c1-140)"
    fi
    git checkout -q -- vdev
done
