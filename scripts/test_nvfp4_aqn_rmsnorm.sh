#!/usr/bin/env bash
# The research plan's run "nvfp4-aqn": W4A16 NVFP4 + AQN on RMSNorm, sigma 0.05 -> 5e-4 (plan: planned).
# Usage: scripts/test_nvfp4_aqn_rmsnorm.sh [N_GPUS|auto] [aqn-rs run options: --model PATH --data PATH --steps N ...]
# N_GPUS 0 or no GPU: a short CPU run on the embedded SmolLM2-135M (the preset's cpu profile).
set -euo pipefail
if command -v aqn-rs >/dev/null 2>&1; then AQN=(aqn-rs); else AQN=("${PYTHON:-python3}" -m aqn_rs.experiments.cli); fi
exec "${AQN[@]}" run nvfp4-aqn --gpus "${1:-auto}" "${@:2}"
