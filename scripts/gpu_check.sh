#!/usr/bin/env bash
# One command on a GPU machine (the device tool's, or any with CUDA, torch and
# compute-sanitizer): install the wheel, run the GPU test suite, compute-sanitizer memcheck
# and racecheck on the quick suite, and the benchmark (order: test, bench, sanitize).
#
#   bash scripts/gpu_check.sh [WHEEL]   # default: the newest .whl_cuda/ or .whl/aqn_rs-*.whl
#
# STAGES (comma-separated, default "test,sanitize,bench") picks stages; each writes its log
# under $OUT (default /tmp/aqn_gpu_check). The machine has no rustc: build the wheel
# elsewhere (maturin build --release --zig --compatibility manylinux_2_17 -o .whl_cuda), carry
# .whl_cuda (and .peers for the peer kernels, see benchmarks/bench_kernels.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/aqn_gpu_check}
STAGES=${STAGES:-test,sanitize,bench}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

WHL=${1:-$(ls -t .whl_cuda/aqn_rs-*.whl .whl/aqn_rs-*.whl 2>/dev/null | head -1)}
if [ -z "$WHL" ]; then
    echo "no wheel given and none in .whl/"
    exit 2
fi
SITE=${AQN_SITE:-/tmp/aqn_site}
rm -rf "$SITE"
$PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHL" || exit 2
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
$PY -c "import aqn_rs, json; print('build_info:', json.dumps(aqn_rs.build_info()))" || exit 2

status=0
has() { [[ ",$STAGES," == *",$1,"* ]]; }

if has test; then
    echo "== test: pytest tests/exact/test_cuda.py"
    $PY -m pytest -q -p no:cacheprovider -rs tests/exact/test_cuda.py 2>&1 | tee "$OUT/pytest.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if has bench; then
    echo "== bench"
    $PY benchmarks/bench_kernels.py ${BENCH_ARGS:-} --out "$OUT/bench.md" --json "$OUT/bench.json" 2>&1 \
        | tee "$OUT/bench.log" | grep -vE "^\| " | tail -n 40
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    # The table itself, last, so it is in the tail of the output.
    grep -E "^\| " "$OUT/bench.md" | head -n 80
fi
if has sanitize; then
    # No caching allocator: every tensor is its own cudaMalloc, so memcheck sees overruns.
    for tool in memcheck racecheck; do
        echo "== sanitize: compute-sanitizer --tool $tool (quick suite)"
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 AQN_CUDA_TEST_QUICK=1 \
            compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 \
            $PY -m pytest -q -p no:cacheprovider -x tests/exact/test_cuda.py \
            -k "not graph and not expandable and not 2_pow_31" 2>&1 | tee "$OUT/sanitize_$tool.log" | tail -n 25
        rc=${PIPESTATUS[0]}
        summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitize_$tool.log" | tail -1)
        echo "== $tool: exit $rc; ${summary:-no summary line}"
        [ "$rc" -eq 0 ] || status=1
    done
fi

echo "== gpu_check: exit $status"
exit $status
