"""The ``slurm`` fixture: a single-node SLURM on localhost for the ``xlbake batch --slurm`` tests (skipped, with the
reason, where SLURM and munge are not installed or the tests do not run as root)."""

import os

import pytest
from slurm_cluster import missing_reason, slurm_cluster


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running one-node SLURM; its clients (sbatch, squeue, scontrol) see it through SLURM_CONF while it runs."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as env:
        previous = os.environ.get("SLURM_CONF")
        os.environ.update(env)
        try:
            yield env
        finally:
            if previous is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = previous
