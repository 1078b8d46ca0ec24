"""Horovod across containers on the session's Docker daemon: the runner's container reaches the other
nodes' containers over SSH on the run's network, with keys made for the run, as pods do on Kubernetes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from launcher_jobs import rank_lines, run_job

from airflow_provider_dnntrain.spec import Environment, Horovod, TrainingJob

EXAMPLE_SCRIPTS = Path(__file__).resolve().parents[3] / "dags" / "scripts"
TEST_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
HOSTILE = "$(touch /tmp/pwned); `id` ' \" ; rm -rf /"


RUNNERS = [{"runner": "mpirun", "controller": "mpi"}, {"controller": "gloo"}]


@pytest.mark.parametrize("dist", RUNNERS, ids=["mpirun", "horovodrun-gloo"])
def test_horovod_ranks_on_two_containers_allreduce_and_train(daemon, launcher, dist):
    job = TrainingJob(
        framework="pytorch", source_directory=str(EXAMPLE_SCRIPTS), entry_script="torch_horovod_digits.py",
        arguments=["--epochs", "2"], distribution=Horovod(node_count=2, network_interface="eth0", **dist),
    )  # fmt: skip
    handle, lines = run_job(launcher, job, "docker-hvd")
    for rank in (0, 1):  # node 0 is filled first
        mine = rank_lines(lines, rank)
        assert f"rank={rank} size=2" in mine and "allreduce_sum=3.0" in mine
        assert re.search(rf"host=\S+-node-{rank}\b", mine), mine
    facts = json.loads((launcher.collect_outputs(handle) / "outputs" / "summary.json").read_text())
    assert facts["size"] == 2 and facts["allreduce_sum"] == 3.0
    assert daemon.held("docker-hvd") == ([], [])


def test_the_other_node_s_rank_gets_secrets_and_arguments_as_given(daemon, launcher):
    """The rank on the other node is started through SSH: its secret comes from the run's file there
    (never a command line), its arguments arrive literally."""
    secret = "s3cr3t-remote-rank-5e"
    job = TrainingJob(
        framework="pytorch", source_directory=str(TEST_SCRIPTS), entry_script="ranks.py",
        arguments=["--print-env", "RANK_SECRET", "--print-argv", HOSTILE],
        distribution=Horovod(node_count=2, controller="gloo", network_interface="eth0"),
        environment=Environment(secrets={"RANK_SECRET": secret}),
    )  # fmt: skip
    _, lines = run_job(launcher, job, "docker-hvd-secret")
    for rank in (0, 1):
        mine = rank_lines(lines, rank)
        assert "RANK_SECRET=***" in mine, mine  # the value reached the rank; the log masks it
        assert json.dumps(HOSTILE) in mine
    assert not any(secret in line.text for line in lines)
    assert daemon.held("docker-hvd-secret") == ([], [])
