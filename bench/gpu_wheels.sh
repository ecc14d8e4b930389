#!/usr/bin/env bash
# Wheels for what ds-train needs beyond a stock CUDA + PyTorch + transformers image, into .whl/
# (git-ignored), for a GPU machine that cannot reach a package index: carry .whl/ there and
# bench/gpu.sh installs them into a private directory before it runs (torch, transformers,
# accelerate, peft, safetensors, tokenizers, pyarrow, pandas, matplotlib stay the image's own).
#
#   bench/gpu_wheels.sh                 # wheels for CPython 3.12 on x86-64 Linux
#   PY_VERSION=3.11 bench/gpu_wheels.sh
#
# The versions are the ones this repo's tests ran with. DeepSpeed ships only a source
# distribution; built here with no torch in its build environment it is a pure-Python wheel
# whose C++/CUDA ops compile on first use (ds-train's default optimizer, torch's fused AdamW,
# needs none of them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=python3
PY_VERSION=${PY_VERSION:-3.12}
binary=(
  hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing_extensions==4.16.0
  webdataset==1.0.2 braceexpand==0.1.7
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 zstandard==0.25.0
)
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${binary[@]}"
"$PY" -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
ls .whl | sed 's/^/  /'
du -sh .whl
