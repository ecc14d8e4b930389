# Sourced by every slurm/*.sbatch once it has found the repository ($home): the site's set-up and
# the Python that runs ds_train. Knobs, all from the environment (`DS_TRAIN_PYTHON=… sbatch …`):
#   DS_TRAIN_SETUP   a file sourced first: module loads, conda/venv activation, proxies
#   DS_TRAIN_PYTHON  the Python, or a command ending in one ("apptainer exec --nv img.sif python");
#                    default: the repository's .venv/bin/python, else python3
if [ -n "${DS_TRAIN_SETUP:-}" ]; then
  # shellcheck disable=SC1090
  source "$DS_TRAIN_SETUP" || { echo "ds_train: sourcing DS_TRAIN_SETUP=$DS_TRAIN_SETUP failed" >&2; exit 2; }
fi
if [ -n "${DS_TRAIN_PYTHON:-}" ]; then
  eval "py=($DS_TRAIN_PYTHON)"
elif [ -x "$home/.venv/bin/python" ]; then
  py=("$home/.venv/bin/python")
else
  py=(python3)
fi
# This checkout's ds_train, whichever Python runs it (a container's, a site's).
export PYTHONPATH="$home${PYTHONPATH:+:$PYTHONPATH}"
