#!/usr/bin/env bash
# The research plan's run "1C": W4A16 MXFP4 + AQN on Linear, sigma 0.005 -> 5e-5 (plan: partial collapse at step 19).
# Usage: scripts/test_mxfp4_exp1c_small_sigma.sh [N_GPUS|auto] [aqn-rs run options: --model PATH --data PATH --steps N ...]
# N_GPUS 0 or no GPU: a short CPU run on the embedded SmolLM2-135M (the preset's cpu profile).
set -euo pipefail
if command -v aqn-rs >/dev/null 2>&1; then AQN=(aqn-rs); else AQN=("${PYTHON:-python3}" -m aqn_rs.experiments.cli); fi
exec "${AQN[@]}" run 1C --gpus "${1:-auto}" "${@:2}"
