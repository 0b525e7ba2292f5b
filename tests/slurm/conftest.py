"""Session fixture: a real two-node Slurm cluster on this machine (slurm/ci_cluster.sh), stopped at the end.

It needs root (the daemons run as SlurmUser=root) and Debian's slurm-wlm + munge, which ci_cluster.sh installs
with apt-get when they are missing. The state directory is fixed so that daemons left by a killed session are
stopped (by the PIDs they wrote) before a new cluster starts.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.slurm.cluster import SlurmCluster

STATE_DIR = Path("/tmp/moetron-slurm-pytest")


@pytest.fixture(scope="session")
def _slurm_session():
    cluster = SlurmCluster(STATE_DIR, nodes=2, gpus_per_node=2)
    cluster.stop()  # leftovers of an interrupted session, if any
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()  # also after a failed start, which may have left some daemons running


@pytest.fixture
def slurm_cluster(_slurm_session):
    """The session's cluster; jobs a test leaves behind (e.g. after a failed assertion) are cancelled after it,
    so the next test finds the nodes free."""
    yield _slurm_session
    _slurm_session.cancel_all()
