#!/usr/bin/env bash
# One device-tool call for the GPU acceptance items of the torch layer, the export and the
# scanner, plus the GPU tests of every layer. Run from the repo root on the GPU
# machine with the compiled extension carried in place (python/aqn_rs/_aqn_rs.abi3.so, built
# here with the pinned nvcc: `maturin develop --release`), e.g.
#   run(command="bash scripts/gpu_acceptance.sh", carry=["python/aqn_rs/_aqn_rs.abi3.so"])
# STAGES selects: tests, step, export, scan (default all). Logs go to $OUT (or ./gpu-out).
set -uo pipefail
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
STAGES=${STAGES:-tests,step,export,scan}
has() { [[ ",$STAGES," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import aqn_rs, json; print(json.dumps(aqn_rs.build_info()))" | tee "$OUT/build_info.json"

if has tests; then
  echo "== GPU tests (CUDA == CPU bit for bit: kernels, noise, hooks, export, scan)"
  python3 -m pytest -q -p no:cacheprovider tests/exact/test_cuda.py tests/exact/test_noise.py \
      tests/unit/test_hooks.py tests/integration/test_export.py tests/integration/test_scan.py -x 2>&1 \
      | tail -n 25 | tee "$OUT/tests.txt"
fi
if has step; then
  echo "== training step overhead, ~1B Llama-style, bf16"
  python3 benchmarks/bench_step.py --json "$OUT/bench_step.json" 2>&1 | tail -n 8 | tee "$OUT/bench_step.txt"
fi
if has export || has scan; then
  python3 - <<'PY'
import torch, transformers
cfg = transformers.Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
torch.manual_seed(0)
transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained("/tmp/qwen15b-random")
print("wrote /tmp/qwen15b-random")
PY
fi
if has export; then
  echo "== export of a random-init Qwen2.5-1.5B-shaped model from GPU memory (target <= 30 s excl. writes)"
  python3 - <<'PY' 2>&1 | tee "$OUT/export.txt"
import time, torch, transformers
import aqn_rs
from aqn_rs.export import _export  # export_checkpoint's body, returning the timing report
m = transformers.AutoModelForCausalLM.from_pretrained("/tmp/qwen15b-random", dtype=torch.bfloat16).cuda()
print("params", sum(p.numel() for p in m.parameters()) / 1e9, "B on", torch.cuda.get_device_name())
for fmt, mode in (("nvfp4", None), ("mxfp4", "floor")):
    r = _export(m, f"/tmp/q15-{fmt}", fmt, mode, ("lm_head", "embed_tokens"), None, "5GB", True,
                None, torch.bfloat16, True, None)
    print(fmt, r.format_summary(), "| excl. writes:", round(r.seconds_total - r.seconds_write, 2), "s")
PY
fi
if has scan; then
  echo "== weights-only scan of the same checkpoint on CUDA (target compute <= 20 s excl. disk read)"
  python3 -m aqn_rs scan --model /tmp/qwen15b-random --quant-type all --device cuda \
      --output "$OUT/scan15b.json" --quiet 2>&1 | tail -n 5
  python3 -c "import json; t = json.load(open('$OUT/scan15b.json'))['timing']; print(t, 'compute_s <= 20:', t['compute_s'] <= 20)" \
      | tee "$OUT/scan.txt"
fi
