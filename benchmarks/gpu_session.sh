#!/usr/bin/env bash
# One short GPU session (a lent machine with minutes of device time, no network): build qdpo._C in
# place, sweep the cuda GEMV's launch choices, run the GPU tests in parallel, the benchmarks that the
# speed targets need, and the cuda kernels' odd-shape tests under compute-sanitizer. Every stage has
# its own time limit, and all of them together stay under TOTAL_S (each stage gets at most what is
# left after the minimum shares of the stages after it), so the script ends, and the results of the
# finished stages come back, before the device call's own limit kills it.
# Results: $1/ (default benchmarks/results/gpu-check). With PACK_DIR set (default: $OUT, the device
# call's folder of files that come back), they are also packed there at the end, as few files:
# gpu-session.tgz (everything) beside summary.md and the sweep's log.
#
#   bash benchmarks/gpu_session.sh /tmp/gc            # the whole session, at most TOTAL_S = 540 s
#   TOTAL_S=3600 TESTS_S=600 BENCH_S=1800 BENCH_K= bash benchmarks/gpu_session.sh   # everything
#   SWEEP_ARGS="--ms 1 16 --splits 0 1 2 4" PROFILE_S=30 GPU_CHECK_ARGS=--skip-bench bash ...  # a kernel change
set -u
OUT_DIR=${1:-benchmarks/results/gpu-check}
PY=${PYTHON:-python3}
TESTS_S=${TESTS_S:-160}
BENCH_S=${BENCH_S:-140}
SANITIZER_S=${SANITIZER_S:-40}
SWEEP_S=${SWEEP_S:-170}
TOTAL_S=${TOTAL_S:-540}       # the whole script, build included (a device call may run 600 s)
PACK_DIR=${PACK_DIR-${OUT:-}}
# The sweep's default here: M = 1 and 16, each variant's own split rule (--splits 0), blocks of 8
# and 4 warps (and of 6 and 3 with the scale in ŵ: --more-warps), x in registers, in shared memory
# (M = 1) and shared by row warps (shared_x), the scale in ŵ and after the mma: the open choices of
# the GEMV plan. It times every place of x and of the grid at the plan's own block size on every
# weight first (about 140 s, estimated at 0.45 s a timing), then the other block sizes while time is
# left. SWEEP_ARGS= (empty) sweeps everything (a longer SWEEP_S).
SWEEP_ARGS=${SWEEP_ARGS-"--ms 1 16 --splits 0"}
PROFILE_S=${PROFILE_S:-0}     # > 0: Nsight Compute on one launch of each GEMV variant (profile_gemv.py)
GPU_CHECK_ARGS=${GPU_CHECK_ARGS:-}  # e.g. --skip-bench
WORKERS=${WORKERS:-8}
# The rows the targets need: bf16 torch.matmul, triton and cuda, decode and prefill sizes; the
# other ops on three shapes. Everything: BENCH_K= (empty).
BENCH_K=${BENCH_K-"not reference and not eager and not triton-gemm and not workspace and not lsq and not fused \
and not autograd and not qdpo-op and not fake_quant+linear and not train_step and not M512 and not torchao \
and not bnb and ((test_dequant_matmul[ and not dx) or ((dx or quantize or fake_quant) and (square-8192 or \
llama3-8b.down or llama2-7b.gate_up)) or test_moe_experts_decode)"}
mkdir -p "$OUT_DIR"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
# limit WANT RESERVE: WANT seconds, or what is left of TOTAL_S less RESERVE (the shares of the stages
# still to come) where that is less; 0 when nothing is left
limit() { local left=$(( TOTAL_S - ($(date +%s) - t0) - $2 )); (( left < $1 )) && echo $(( left > 0 ? left : 0 )) || echo "$1"; }
pack() {
    [ -n "$PACK_DIR" ] || return 0
    mkdir -p "$PACK_DIR" && tar czf "$PACK_DIR/gpu-session.tgz" -C "$OUT_DIR" . \
        && cp "$OUT_DIR/summary.md" "$OUT_DIR/sweep_gemv.log" "$PACK_DIR/" 2>/dev/null
    echo "packed into $PACK_DIR: $(ls "$PACK_DIR" | tr '\n' ' ')"
}
trap pack EXIT

stamp "device"; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

stamp "build qdpo._C (sm_${QDPO_CUDA_ARCHS:=90})"
export QDPO_CUDA_ARCHS
if ! $PY setup.py -q build_ext --inplace >"$OUT_DIR/build.log" 2>&1; then
    # the Triton backend's tests and benchmarks still run; the cuda ones skip
    tail -30 "$OUT_DIR/build.log"; stamp "build FAILED"
fi
$PY -c "from qdpo.kernels import cuda; print('qdpo._C loaded, CUDA runtime', cuda.RUNTIME_VERSION)"

SWEEP_S=$(limit "$SWEEP_S" 200)  # leaves the tests and benchmarks at least 200 s
if [ "$SWEEP_S" -gt 30 ]; then
    stamp "sweep of the cuda GEMV's launch choices (benchmarks/sweep_gemv.py, ${SWEEP_S} s)"
    timeout "$SWEEP_S" $PY benchmarks/sweep_gemv.py --out "$OUT_DIR" --time-limit-s $(( SWEEP_S - 20 )) \
        $SWEEP_ARGS >"$OUT_DIR/sweep_gemv.log" 2>&1
    echo "sweep exit $?"; tail -60 "$OUT_DIR/sweep_gemv.log"
fi

PROFILE_S=$(limit "$PROFILE_S" 200)
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ "$PROFILE_S" -gt 0 ] && [ -n "$NCU" ]; then
    stamp "Nsight Compute: one launch of each GEMV variant ($NCU)"
    # every stall reason per issued instruction (the WarpStateStats section names only the largest)
    timeout "$PROFILE_S" "$NCU" -k regex:"gemv|gemm|nvjet" --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
        $PY benchmarks/profile_gemv.py >"$OUT_DIR/profile_gemv.log" 2>&1
    echo "ncu exit $?"; grep -E "== launch|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Stall|ERR" \
        "$OUT_DIR/profile_gemv.log" | head -80
    grep -E "== launch|issue_stalled_(long_scoreboard|short_scoreboard|wait|math_pipe|mio|lg_throttle|not_selected|barrier)" \
        "$OUT_DIR/profile_gemv.log" | head -120
elif [ "$PROFILE_S" -gt 0 ]; then
    echo "no ncu on this machine"
fi

SAN_SHARE=$(( SANITIZER_S > 0 ? 20 : 0 ))
TESTS_S=$(limit "$TESTS_S" $(( 60 + SAN_SHARE )))
BENCH_S=$(limit "$BENCH_S" $(( TESTS_S + SAN_SHARE )))
(( BENCH_S < 20 )) && GPU_CHECK_ARGS="$GPU_CHECK_ARGS --skip-bench"
stamp "GPU tests (${TESTS_S} s) and benchmarks (${BENCH_S} s)"
$PY benchmarks/gpu_check.py --out "$OUT_DIR" --workers "$WORKERS" --timeout-s "$TESTS_S" \
    --bench-timeout-s "$BENCH_S" ${BENCH_K:+--bench-k "$BENCH_K"} $GPU_CHECK_ARGS
grep -E "passed|failed|FAILED|error" "$OUT_DIR/tests.log" | tail -25

SANITIZER_S=$(limit "$SANITIZER_S" 5)
if command -v compute-sanitizer >/dev/null && [ "$SANITIZER_S" -gt 10 ]; then
    stamp "compute-sanitizer memcheck: the cuda kernels on odd and misaligned shapes"
    timeout "$SANITIZER_S" compute-sanitizer --tool memcheck --error-exitcode 9 \
        $PY -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py -x \
        -k "odd_shapes or long_and_narrow or misaligned or aligned_to or zero_rows or every_launcher or partial_last_step \
        or chunk_widths or experts" \
        >"$OUT_DIR/sanitizer.log" 2>&1
    echo "compute-sanitizer exit $? (9: memory errors found, 124: stopped at ${SANITIZER_S} s)"
    grep -E "ERROR SUMMARY|passed|failed|Invalid" "$OUT_DIR/sanitizer.log" | head -10
fi
stamp "done"
sed -n '/## Speed targets/,/^overall/p' "$OUT_DIR/summary.md" | grep -v "^# benchmarks" | head -80
