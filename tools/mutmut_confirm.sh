#!/usr/bin/env bash
# Check that new tests kill mutmut's survivors, quickly: for each mutant named on stdin,
# apply it to this tree (mutmut apply), run the given tests with -x, restore vdev/ from git.
#
#   python3 tools/mutmut_score.py survivors MODULE | awk '{print $2}' |
#       bash tools/mutmut_confirm.sh tests/skywalk/test_ring_index_rules.py
#
#   ... | bash tools/mutmut_confirm.sh --live tests/virtio/test_chain_rules.py
#
# --live runs the tests inside mutmut's working copy instead (cd mutants/, the mutant chosen
# by MUTANT_UNDER_TEST, which mutmut's trampolines read): nothing under vdev/ is touched,
# so it is safe while a mutmut run goes on; the test files named are copied into
# mutants/tests first.  Neither mode sets VDEV_MUTATION: the tests run with their full
# hypothesis settings and without the deselections of [tool.mutmut].
#
# Prints KILLED (with the first failing test) or SURVIVED per mutant.  Refuses to run with
# uncommitted changes under vdev/ (it restores vdev/ with git checkout).  Never run it while
# a mutmut run is generating mutants: mutmut would copy the applied mutant into mutants/ as
# if it were the source (this happened once; rm mutants/<file>* and rerun to recover).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --live ]; then
    shift
    [ -d mutants/vdev ] || { echo "no mutants/: run scripts/mutate.sh first" >&2; exit 2; }
    for t in "$@"; do
        case "$t" in tests/*.py | tests/*.py::*) f=${t%%::*}; mkdir -p "mutants/$(dirname "$f")"; cp "$f" "mutants/$f" ;; esac
    done
    out=$(mktemp)
    trap 'rm -f "$out"' EXIT
    while read -r name; do
        [ -z "$name" ] && continue
        if (cd mutants && MUTANT_UNDER_TEST="$name" CI=1 timeout 600 nice -n 19 \
            python3 -m pytest -q -x -p no:cacheprovider -p no:xdist -p no:randomly "$@" >"$out" 2>&1); then
            echo "SURVIVED $name"
        else
            echo "KILLED   $name  $(grep -m1 -E '^(FAILED|ERROR) [^ ]' "$out" | cut -c1-140)"
        fi
    done
    exit 0
fi
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
        echo "KILLED   $name  $(grep -m1 -E '^(FAILED|ERROR) [^ ]' "$out" | cut -c1-140)"
    fi
    git checkout -q -- vdev
done
