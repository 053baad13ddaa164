#!/usr/bin/env bash
# Wheels that scripts/gpu-check.sh installs on a GPU machine that has torch but no network: the
# transformers this project needs (its image has an older one) and the pure-Python packages the GPU part of
# the suite imports. Downloaded into .gpu-wheels/ (git-ignored; carried to the device).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
version() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .gpu-wheels
for pkg in transformers huggingface_hub accelerate safetensors; do
    pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .gpu-wheels "$pkg==$(version "$pkg")"
done
pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .gpu-wheels llava-torch==1.2.2.post1
du -sh .gpu-wheels && ls .gpu-wheels
