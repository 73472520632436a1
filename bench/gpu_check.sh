#!/usr/bin/env bash
# The GPU check: the seed command on a random full-size SDXL at 1024 px (--fp8_base), then --xformers, --full_fp16,
# --full_bf16, --mixed_precision bf16 and --torch_compile, one short run each; one row per run with s/it and peak
# VRAM; exit 1, with the failing runs' last lines, on any error. About 8-10 minutes on one H200-class GPU, 7 GB of
# disk under bench_out/gpu_check (the random model is written once and reused). bench/gpu_check.py does the work.
#
# Set-up, once, on the GPU machine (Python 3.10+, the torch build that matches the CUDA driver):
#   python3 -m venv .venv-gpu
#   .venv-gpu/bin/pip install torch --index-url https://download.pytorch.org/whl/cu128
#   .venv-gpu/bin/pip install -r requirements.txt
#   .venv-gpu/bin/pip install "xformers>=0.0.27"   # optional: the --xformers row says "skipped" without it
# or a Python that already has the CUDA torch and the requirements:
#   GPU_CHECK_PYTHON=/path/to/python3 bash bench/gpu_check.sh
# The check first lists every module that Python lacks (and stops), so one try says what to install. A GPU machine
# that cannot reach PyPI but has torch (e.g. a python3 with torch 2.11+cu130 on Python 3.12) needs the rest as
# wheels, downloaded elsewhere and installed there without an index:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl \
#     diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 lion-pytorch==0.2.5 tomli_w==1.2.0
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# Run:
#   bash bench/gpu_check.sh [--summary FILE.json] [--only seed bf16 ...] [--skip torch_compile] [--model X.safetensors]
#   bash bench/gpu_check.sh --dry-run     # or GPU_CHECK_CPU=1: the same sequence on the CPU, tiny SDXL at 64 px
#   bash bench/gpu_check.sh --list        # the runs and their exact commands
# Python: $GPU_CHECK_PYTHON, else .venv-gpu/bin/python (.venv/bin/python for a dry run), else python3.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

dry_run=0
if [[ "${GPU_CHECK_CPU:-0}" != "0" && -n "${GPU_CHECK_CPU:-}" ]]; then
  dry_run=1
fi
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then
    dry_run=1
  fi
done

python="${GPU_CHECK_PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ "$dry_run" == 1 ]]; then
    candidates=(.venv/bin/python .venv-gpu/bin/python python3)
  else
    candidates=(.venv-gpu/bin/python python3)
  fi
  for candidate in "${candidates[@]}"; do
    if command -v "$candidate" >/dev/null 2>&1; then
      python="$candidate"
      break
    fi
  done
fi
if [[ -z "$python" ]]; then
  echo "error: no Python found: set GPU_CHECK_PYTHON or create .venv-gpu (see the top of $0)" >&2
  exit 2
fi

mode=()
if [[ "$dry_run" == 1 ]]; then
  mode=(--dry-run)
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# "${x[@]+...}": an empty array under `set -u` on bash < 4.4
exec "$python" bench/gpu_check.py ${mode[@]+"${mode[@]}"} "$@"
