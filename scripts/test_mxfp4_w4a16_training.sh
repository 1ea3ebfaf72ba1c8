#!/usr/bin/env bash
# The research plan's run "mxfp4-only": W4A16 MXFP4 fake quant, no AQN (plan: 70.05%).
# Usage: scripts/test_mxfp4_w4a16_training.sh [N_GPUS|auto] [aqn-rs run options: --model PATH --data PATH --steps N ...]
# N_GPUS 0 or no GPU: a short CPU run on the embedded SmolLM2-135M (the preset's cpu profile).
set -euo pipefail
if command -v aqn-rs >/dev/null 2>&1; then AQN=(aqn-rs); else AQN=("${PYTHON:-python3}" -m aqn_rs.experiments.cli); fi
exec "${AQN[@]}" run mxfp4-only --gpus "${1:-auto}" "${@:2}"
