#!/usr/bin/env bash
# The project's test command (README): the Rust core's unit tests, then the Python suite
# against the installed package. GPU tests skip themselves on machines without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --quiet
# `import aqn_rs` resolves to the installed package (the sources live under python/).
python -m pytest -q -p no:cacheprovider --rootdir=. tests "$@"
# The verl plugin against a real verl, where one is installed in another environment (verl pins
# an older transformers than the local engine uses): AQN_VERL_PYTHON=/path/to/python.
if [ -n "${AQN_VERL_PYTHON:-}" ]; then
    "$AQN_VERL_PYTHON" -m pytest -q -p no:cacheprovider --rootdir=. tests/integration/test_verl_plugin.py "$@"
fi
