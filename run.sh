#!/usr/bin/env bash
# ds_train quick start. Every command first does all set-up it needs (idempotent):
#   ./run.sh demo          set up, then run the embedded demo (corpus → shards → 2-rank ZeRO-3 pretraining → HF export)
#   ./run.sh test [ARGS]   set up (incl. the system packages of the Slurm and NVMe-offload tests), then run the test suite (pytest ARGS)
#   ./run.sh setup         set up only: .venv/ with torch, DeepSpeed and ds_train
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY=$VENV/bin/python

pip_install() {
  # This machine's pip config lists local package indexes that print one harmless warning per package.
  "$PY" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

setup() {
  if [ ! -x "$PY" ]; then
    # A machine that already has torch (a GPU box, an NGC container) keeps it: the venv sees it.
    if python3 -c 'import torch' 2>/dev/null; then
      python3 -m venv --system-site-packages "$VENV"
    else
      python3 -m venv "$VENV"
    fi
  fi
  if ! "$PY" -c 'import torch' 2>/dev/null; then
    # Plain `pip install torch` pulls a multi-GB CUDA build; this version is served as a local CPU wheel.
    pip_install "torch==${DS_TRAIN_TORCH_VERSION:-2.13.0}"
  fi
  local stamp="$VENV/.ds_train-installed"
  local want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    pip_install -e '.[dev]'
    echo "$want" > "$stamp"
  fi
}

case "${1:-}" in
  setup)
    setup
    ;;
  demo)
    shift
    setup
    exec "$VENV/bin/ds-train" demo "$@"
    ;;
  test)
    shift
    setup
    bash tests/setup_system_packages.sh || echo "run.sh: system packages could not be installed; the tests needing them (Slurm, NVMe offload) will be skipped" >&2
    exec "$PY" -m pytest "$@"
    ;;
  *)
    echo "usage: ./run.sh demo | test [pytest args] | setup" >&2
    exit 2
    ;;
esac
