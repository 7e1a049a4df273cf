#!/bin/bash
# gpu-ab.sh - A/B of environment switches on the GPU machine, in one call: bench-cuda runs once
# per setting, the settings alternating for ROUNDS rounds (lease-to-lease speed differs by up to
# ~10%, so only numbers of one call compare), and one line per run gives tokens/s per depth.
#
#   bash bench/gpu-ab.sh BENCH_CUDA MODEL "SETTING ..." [bench-cuda args ...]
#   e.g. bash bench/gpu-ab.sh build/native/cuda/bench-cuda smol.gguf \
#            "CKV_NORM_TAIL=0 CKV_NORM_TAIL=1" --tg 128 --depths 0,2048,8000
#
# A setting is one VAR=VALUE, or several joined by commas ("A=0,B=1"); "-" is the defaults.
set -u
BENCH=$1 MODEL=$2 SETTINGS=$3
shift 3
ROUNDS=${ROUNDS:-2}
for r in $(seq "$ROUNDS"); do
    for s in $SETTINGS; do
        vars=()
        [ "$s" != "-" ] && IFS=, read -r -a vars <<< "$s"
        line=$(env "${vars[@]}" timeout 300 "$BENCH" "$MODEL" --reps 3 --pp 16 "$@" 2> /dev/null | tr -d '\n' |
               grep -o '"test": "tg[^}]*' | sed -E 's/.*"n_depth": ([0-9]+), "avg_ts": ([0-9.]+).*/d\1 \2/' | tr '\n' ' ')
        echo "round $r  $s:  ${line:-failed}"
    done
done
