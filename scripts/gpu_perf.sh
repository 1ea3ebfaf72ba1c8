#!/usr/bin/env bash
# One device-tool call for the speed measurements of the step, the weight sync and the kernels
# (docs/results/BENCHMARKS.md), after the GPU tests of what they time. Run from the repo root on
# the GPU machine with the wheel's extension carried (built here with the pinned nvcc, as in
# scripts/gpu_check.sh, and unzipped to .whl_cuda/_aqn_rs.abi3.so), e.g.
#   run(command="bash scripts/gpu_perf.sh", carry=[".whl_cuda", ".peers", ".ci-wheels"])
# .whl_cuda holds _aqn_rs.abi3.so and extra/ (hypothesis and its dependencies as wheels);
# .peers / .ci-wheels give bench_step its verl QATLinear column. Outputs go to $OUT/r.tgz.
# Time limits per stage: TEST_T, SAN_T, STEP_T, SYNC_T, KER_T (seconds).
set -u
S=$(date +%s)
el() { echo "[t+$(( $(date +%s) - S ))s] $*"; }
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu-out}
R=$OUT/r; mkdir -p "$R"
if [ -d .whl_cuda/extra ]; then
  pip install -q --no-index --no-deps --target /tmp/extra .whl_cuda/extra/*.whl >/dev/null 2>&1
fi
[ -f .whl_cuda/_aqn_rs.abi3.so ] && cp .whl_cuda/_aqn_rs.abi3.so python/aqn_rs/
export PYTHONPATH=$PWD/python:/tmp/extra
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/card.txt"
timeout "${TEST_T:-120}" python3 -m pytest -q -p no:cacheprovider tests/exact/test_cuda_l2_keep.py \
    tests/exact/test_cuda_many.py > "$R/tests.txt" 2>&1; el "tests rc=$?"; tail -3 "$R/tests.txt"
# The hinted kernels under memcheck (as scripts/gpu_check.sh runs it: no caching allocator, so
# every tensor is its own allocation and an overrun is seen).
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SAN_T:-150}" compute-sanitizer --tool memcheck \
    --error-exitcode 99 --print-limit 20 python3 -m pytest -q -p no:cacheprovider \
    tests/exact/test_cuda_l2_keep.py > "$R/memcheck.txt" 2>&1
el "memcheck rc=$?"; grep -E "ERROR SUMMARY|passed|failed" "$R/memcheck.txt" | tail -2
timeout "${STEP_T:-300}" python3 benchmarks/bench_step.py --profile --profile-micro 1 --micro-size 8 \
    --rounds 3 --steps 8 --micro 1 4 --many-batch-mb 24 --l2-keep-mb 24 --json "$R/step.json" > "$R/step.txt" 2>&1
el "step rc=$?"
grep -E "^(none|bf16|w4a16|verl|variant|==)|kernel|overhead" "$R/step.txt" | head -40
timeout "${SYNC_T:-40}" python3 benchmarks/bench_sync.py --format nvfp4 --reps 3 > "$R/sync.txt" 2>&1
el "sync rc=$?"; tail -6 "$R/sync.txt"
timeout "${KER_T:-200}" python3 benchmarks/bench_kernels.py --quick --l2-keep-mb 16 32 40 \
    --out "$R/bench.md" --json "$R/bench.json" > "$R/bench.log" 2>&1
el "kernels rc=$?"; grep -vE "^\| " "$R/bench.log" | tail -24
tar czf "$OUT/r.tgz" -C "$OUT" r && rm -rf "$R"
