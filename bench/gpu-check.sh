#!/bin/bash
# gpu-check.sh - one device call that builds the CUDA backend and checks it: the kernel tests
# against their CPU twins, the ClusterKV kernel timings, and decode on a synthetic
# Llama-3-8B-shape Q4_0 model (bench-cuda): full vs streaming / quest / clusterkv at 8k and 32k,
# clusterkv with kv_offload, and a batch of 4 sequences. With a GGUF path as the first argument it
# also runs the end-to-end checks on that model (test-cuda-e2e and tests/python/test_cuda.py,
# which need the cffi wheel in .whl/ on a machine without it).
#
#   bash bench/gpu-check.sh [MODEL.gguf]      # from the repo root, on the GPU machine
#
# Every step has its own time limit and prints one summary line, so a hang shows as a timeout
# of that step and the rest still runs. Work files go to $WORK (default /tmp/gpu-check).
set -u
WORK=${WORK:-/tmp/gpu-check}
B=$WORK/build
C=$B/native/cuda
T0=$(date +%s)
mkdir -p "$WORK"
step() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

( python3 bench/make_synthetic_gguf.py --mix q4_0 --out "$WORK/synth-q4_0.gguf" > "$WORK/synth.log" 2>&1 ) &
SYNTH=$!
cmake -S . -B "$B" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 > "$WORK/build.log" 2>&1 &&
    cmake --build "$B" -j"$(nproc)" >> "$WORK/build.log" 2>&1
step "build rc=$?"; grep -E "error" "$WORK/build.log" | head -10

timeout 150 "$C/test-cuda-ops" > "$WORK/ops.txt" 2>&1
step "test-cuda-ops rc=$?: $(tail -1 "$WORK/ops.txt")"; grep FAIL "$WORK/ops.txt" | head -5
timeout 120 "$C/test-cuda-clusterkv" > "$WORK/ckv.txt" 2>&1
step "test-cuda-clusterkv rc=$?: $(tail -1 "$WORK/ckv.txt")"; grep FAIL "$WORK/ckv.txt" | head -5
timeout 60 "$C/test-cuda-clusterkv" --bench 2>&1 | grep -E "select|sparse|dense|kmeans"
step "clusterkv kernel timings"

wait $SYNTH
M=$WORK/synth-q4_0.gguf
tg() {   # the tg lines of one bench-cuda run
    timeout 120 "$C/bench-cuda" "$M" --reps 2 --pp 16 --tg 128 "$@" 2> "$WORK/err.txt" |
        tr -d '\n' | grep -o '"test": "tg[^}]*' | cut -c1-700
    tail -2 "$WORK/err.txt"
}
step "8B full:"; tg --depths 8192,32768
step "8B clusterkv B=2048:"; tg --depths 8192,32768 --kv-policy clusterkv --kv-budget 2048
step "8B clusterkv B=2048 per KV head:"; tg --depths 32768 --kv-policy clusterkv --kv-budget 2048 --per-kv-head 1
for pol in streaming quest; do step "8B $pol B=2048:"; tg --depths 32768 --kv-policy $pol --kv-budget 2048; done
step "8B clusterkv B=2048, kv_offload:"; tg --depths 32768 --kv-policy clusterkv --kv-budget 2048 --kv-offload 1 --ubatch 2048
step "8B batch of 4, clusterkv B=2048:"; tg --depths 32768 --kv-policy clusterkv --kv-budget 2048 --batch 4

if [ $# -ge 1 ]; then
    MODEL=$1
    if ls .whl/*.whl > /dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl &&
            export PYTHONPATH=$WORK/site
    fi
    timeout 60 "$C/test-cuda-e2e" "$MODEL" 256 > "$WORK/e2e.txt" 2>&1
    step "test-cuda-e2e rc=$?"; tail -3 "$WORK/e2e.txt"
    CLUSTERKV_LIB=$B/libclusterkv.so CLUSTERKV_TEST_GPU_MODEL=$MODEL \
        timeout 400 python3 -m pytest -q -rs -s -p no:cacheprovider tests/python/test_cuda.py > "$WORK/pytest.txt" 2>&1
    step "test_cuda.py rc=$?: $(tail -1 "$WORK/pytest.txt")"
    grep -E "GPU vs CPU|GPU batch|kv_offload|overlap|^E " "$WORK/pytest.txt" | head -20
    for args in "" "--kv-policy streaming --kv-budget 1024" "--kv-policy quest --kv-budget 1024" \
                "--kv-policy clusterkv --kv-budget 1024"; do
        timeout 60 "$C/bench-cuda" "$MODEL" --reps 3 --pp 512 --tg 128 --depths 8000 $args 2>&1 |
            tr -d '\n' | grep -o '"test": "tg[^}]*' | cut -c1-420
    done
    step "model decode at depth 8000"
fi
step "done"
