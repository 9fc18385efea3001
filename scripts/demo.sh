#!/usr/bin/env bash
# Install the runtime (no test tools, no vLLM, no browser), then run the whole build on the built-in
# synthetic demo: offline, on the CPU, a couple of minutes. Usage: bash scripts/demo.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh runtime
. .venv/bin/activate
export TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled
sae-traits demo --out "${1:-demo_out}"
