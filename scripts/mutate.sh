#!/usr/bin/env bash
# Mutation testing of the trust-boundary validators (issue 12 item 5); not part of CI (hours).
#
#   bash scripts/mutate.sh [MODULE ...] [--sample K]
#
# MODULE: validate chain codec split packed slotwork pool backend (mutmut over the Python
# module, config in pyproject's [tool.mutmut]) or fastpath (the hand-written fastpath.c
# mutants of tools/mutants/*.toml, run by tools/mutate.py).  Default: all, fewest mutants
# first.  --sample K runs only the mutants whose number is divisible by K (deterministic,
# spread over every function; see tools/mutmut_score.py).  Runs niced, one test process at
# a time; prints the score table at the end (killed / survived / timeout / no tests).
# mutmut's working copy is mutants/ (git-ignored); rm -rf mutants to start from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
ALL=(validate chain codec split packed slotwork pool backend fastpath)
mods=()
sample=1
while [ $# -gt 0 ]; do
    case "$1" in
        --sample) sample="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) mods+=("$1"); shift ;;
    esac
done
[ ${#mods[@]} -eq 0 ] && mods=("${ALL[@]}")
# mutmut puts mutants/ first on sys.path and removes this tree; a PYTHONPATH naming this
# tree is removed with it.  CI=1: derandomized hypothesis, so a verdict is reproducible.
export CI=1
ran=()
for m in "${mods[@]}"; do
    if [ "$m" = fastpath ]; then
        echo "== fastpath.c: hand-written mutants (tools/mutants/fastpath.toml, section5.toml)"
        nice -n 15 python3 tools/mutate.py tools/mutants/fastpath.toml tools/mutants/section5.toml \
            --only $(python3 - <<'PY'
import sys, tomllib
ids = []
for f in ("tools/mutants/fastpath.toml", "tools/mutants/section5.toml"):
    for m in tomllib.load(open(f, "rb")).get("mutant", []):
        files = [m["file"], *(e["file"] for e in m.get("also", []))]
        if any(x.endswith("fastpath.c") for x in files):
            ids.append(m["id"])
print(" ".join(ids))
PY
)
        continue
    fi
    case " ${ALL[*]} " in *" $m "*) ;; *) echo "unknown module $m (want: ${ALL[*]})" >&2; exit 2 ;; esac
    echo "== $m (mutmut, sample 1/$sample)"
    if [ "$sample" = 1 ]; then
        names=("vdev.*.$m.*")
    else
        # the names exist once mutmut has generated its mutants: generate them first
        [ -e "mutants/vdev" ] || nice -n 15 python3 -m mutmut run --max-children 1 "vdev.skywalk.validate.*"
        mapfile -t names < <(python3 tools/mutmut_score.py names "$m" --sample "$sample")
    fi
    nice -n 15 python3 -m mutmut run --max-children 1 "${names[@]}"
    ran+=("$m")
done
if [ ${#ran[@]} -gt 0 ]; then
    python3 tools/mutmut_score.py table "${ran[@]}"
    echo "survivors: python3 tools/mutmut_score.py survivors MODULE; one: python3 -m mutmut show NAME"
fi
