#!/usr/bin/env bash
# Install, then run the whole build on the built-in synthetic demo (offline, CPU, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled
python -m pipeline.demo --out "${1:-demo_out}"
