#!/usr/bin/env bash
# Wheels for what ds-train needs beyond a stock CUDA + PyTorch + transformers image, into .whl/
# (git-ignored), for a GPU machine that cannot reach a package index: carry .whl/ there and
# bench/gpu.sh installs them into a private directory before it runs (torch, transformers,
# accelerate, peft, safetensors, tokenizers, pyarrow, pandas, matplotlib stay the image's own).
# Not `datasets`: the benchmarks write their shards directly, and a carried `datasets` the image's
# pyarrow or fsspec does not satisfy would break `import transformers.trainer` (it imports
# datasets whenever it is installed), taking the HF Trainer anchor with it.
#
#   bench/gpu_wheels.sh                 # wheels for CPython 3.12 on x86-64 Linux
#   PY_VERSION=3.11 bench/gpu_wheels.sh
#
# Each package at the version installed in this repo's .venv (the one the tests ran with), read
# from it rather than pinned here, so the wheels follow the environment. DeepSpeed ships only a
# source distribution; built here with no torch in its build environment it is a pure-Python wheel
# whose C++/CUDA ops compile on first use (ds-train's default optimizer, torch's fused AdamW,
# needs none of them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PY_VERSION=${PY_VERSION:-3.12}
# name==version for each, from $PY's environment (fails, naming it, if one is not installed there)
pins=$("$PY" - <<'PYEOF'
from importlib.metadata import version
for name in ("hjson", "pydantic", "pydantic_core", "annotated-types", "typing-inspection",
             "typing_extensions", "webdataset", "braceexpand", "zstandard"):
    print(f"{name}=={version(name)}")
PYEOF
)
mapfile -t binary <<<"$pins"
deepspeed=$("$PY" -c 'from importlib.metadata import version; print(version("deepspeed"))')
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${binary[@]}"
"$PY" -m pip wheel -q --no-deps -w .whl "deepspeed==$deepspeed"
ls .whl | sed 's/^/  /'
du -sh .whl
