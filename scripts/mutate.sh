#!/usr/bin/env bash
# Mutation testing of the trust-boundary validators (issue 12 item 5); not part of CI (hours).
#
#   bash scripts/mutate.sh [MODULE[:K] ...] [--sample K]
#
# MODULE: validate chain codec split packed slotwork pool backend (mutmut over the Python
# module, config in pyproject's [tool.mutmut]) or fastpath (the hand-written fastpath.c
# mutants of tools/mutants/*.toml, run by tools/mutate.py).  Default: all, fewest mutants
# first.  --sample K (or MODULE:K for one module) runs only every K-th mutant of the
# module (deterministic, spread over its functions; see tools/mutmut_score.py).  Runs
# under nice -n 19, one test process at a time; prints the score table at the end (killed /
# survived / timeout / no tests).  VDEV_MUTATION=N (default 20) caps every hypothesis test
# at N derandomized examples (tests/conftest.py); the tests deselected under mutation are
# listed in pyproject's [tool.mutmut].
# mutmut's working copy is mutants/ (git-ignored); rm -rf mutants to start from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
ALL=(validate chain codec split packed slotwork pool backend fastpath)
mods=()
sample=1
sample_any=0
while [ $# -gt 0 ]; do
    case "$1" in
        --sample) sample="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) mods+=("$1"); shift ;;
    esac
done
[ ${#mods[@]} -eq 0 ] && mods=("${ALL[@]}")
# mutmut puts mutants/ first on sys.path and removes this tree; a PYTHONPATH naming this
# tree is removed with it.  CI=1: derandomized hypothesis, so a verdict is reproducible.
export CI=1
export VDEV_MUTATION="${VDEV_MUTATION:-20}"
pymods=()
for m in "${mods[@]}"; do
    case " ${ALL[*]} " in *" ${m%%:*} "*) ;; *) echo "unknown module $m (want: ${ALL[*]})" >&2; exit 2 ;; esac
    [ "$m" = fastpath ] || pymods+=("$m")
    case "$m" in *:*) sample_any=1 ;; esac
done
if [ ${#pymods[@]} -gt 0 ]; then
    # One mutmut run for all the modules asked for: one mutant generation and one clean run.
    echo "== mutmut: ${pymods[*]} (sample 1/$sample unless MODULE:K)"
    names=()
    if [ "$sample" = 1 ] && [ "$sample_any" = 0 ]; then
        for m in "${pymods[@]}"; do names+=("vdev.*.$m.*"); done
    else
        # the names exist once mutmut has generated its mutants: generate them first
        [ -e "mutants/vdev/skywalk/validate.py.meta" ] ||
            nice -n 19 python3 -m mutmut run --max-children 1 "vdev.skywalk.validate.*"
        mapfile -t names < <(python3 tools/mutmut_score.py names "${pymods[@]}" --sample "$sample")
    fi
    nice -n 19 python3 -m mutmut run --max-children 1 "${names[@]}"
    python3 tools/mutmut_score.py table "${pymods[@]%%:*}"
    echo "survivors: python3 tools/mutmut_score.py survivors MODULE; one: python3 -m mutmut show NAME"
fi
case " ${mods[*]} " in
    *" fastpath "*)
        # The C-only list; the section5.toml mutants that break a check in slotwork.py and
        # fastpath.c together are run with: python3 tools/mutate.py tools/mutants/section5.toml
        # --prefix sky-
        echo "== fastpath.c: hand-written mutants (tools/mutants/fastpath.toml)"
        nice -n 19 python3 tools/mutate.py tools/mutants/fastpath.toml
        ;;
esac
