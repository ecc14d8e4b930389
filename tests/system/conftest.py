"""The local two-node Slurm cluster, started once per test session (see slurm_cluster.py).

Without Slurm/munge or root the tests that need it skip with the reason; DS_TRAIN_REQUIRE_SLURM=1
turns that into a failure."""

from __future__ import annotations

import os
import sys

import pytest

from tests.helpers import clean_env
from tests.system.slurm_cluster import ClusterError, SlurmCluster, unavailable


def _no_cluster(message: str) -> None:
    """Skip, with the reason; fail instead where DS_TRAIN_REQUIRE_SLURM=1 (a CI that must run them)."""
    if os.environ.get("DS_TRAIN_REQUIRE_SLURM") == "1":
        pytest.fail(f"{message} (DS_TRAIN_REQUIRE_SLURM=1)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = unavailable()
    if reason:
        _no_cluster(f"no local Slurm cluster: {reason}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except (ClusterError, OSError) as e:
        cluster.stop()
        _no_cluster(f"the local Slurm cluster did not start: {e}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def slurm_env(slurm_cluster):
    """What a user's shell has when they call sbatch: this checkout's Python, no launcher leftovers."""

    def make(**extra: str) -> dict:
        # No DS_TRAIN_HOME: the batch scripts must find the checkout from where they were submitted.
        return slurm_cluster.env(clean_env({"DS_TRAIN_PYTHON": sys.executable, **extra}))

    return make
