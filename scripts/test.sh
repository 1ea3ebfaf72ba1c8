#!/usr/bin/env bash
# The project's test command (README): the Rust core's unit tests, then the Python suite
# against the installed package. GPU tests skip themselves on machines without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --quiet
# `import aqn_rs` resolves to the installed package (the sources live under python/).
python -m pytest -q -p no:cacheprovider --rootdir=. tests "$@"
