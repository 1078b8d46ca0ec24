"""Multi-node torchrun topologies on the local launcher: real processes exchanging tensors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hostile import HOSTILE_ARGUMENTS, PWNED

from airflow_provider_dnntrain.backends.base import wait_for_job
from airflow_provider_dnntrain.backends.local.launcher import LocalLauncher
from airflow_provider_dnntrain.spec import TorchDistributed, TrainingJob

EXAMPLE_SCRIPTS = Path(__file__).resolve().parents[3] / "dags" / "scripts"
TEST_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_nodes_one_process_each(tmp_path, rendezvous):
    job = TrainingJob(
        framework="pytorch",
        source_directory=str(EXAMPLE_SCRIPTS),
        entry_script="torch_ddp_digits.py",
        arguments=["--epochs", "2"],
        distribution=TorchDistributed(node_count=2, process_count_per_node=1, rendezvous=rendezvous),
    )
    launcher = LocalLauncher(work_root=tmp_path)
    handle = launcher.submit(job, launcher.plan(job, f"ddp-{rendezvous}"), extra_env={})
    lines = []
    wait_for_job(launcher, handle, lines.append, timeout=240)
    text = {
        name: "\n".join(line.text for line in lines if line.replica == name) for name in ("node-0", "node-1")
    }
    ranks = {name: re.search(r"rank=(\d) world_size=2", t).group(1) for name, t in text.items()}
    if rendezvous == "static":
        assert ranks == {"node-0": "0", "node-1": "1"}
    else:  # c10d numbers nodes in the order they join
        assert sorted(ranks.values()) == ["0", "1"]
    checksums = {name: re.search(r"weights_checksum=(\S+)", t).group(1) for name, t in text.items()}
    assert checksums["node-0"] == checksums["node-1"]
    facts = json.loads((launcher.collect_outputs(handle) / "outputs" / "summary.json").read_text())
    assert facts["allreduce_sum"] == 3.0
    assert (handle.run_dir / "artifacts" / "outputs" / "model" / "model.pt").stat().st_size > 0
    assert list((handle.run_dir / "artifacts" / "logs" / "torchrun").rglob("stdout.log"))


def test_hostile_arguments_reach_every_torchrun_worker_literally(tmp_path):
    job = TrainingJob(
        framework="pytorch",
        source_directory=str(TEST_SCRIPTS),
        entry_script="ranks.py",
        arguments=HOSTILE_ARGUMENTS,
        distribution=TorchDistributed(node_count=1, process_count_per_node=2),
    )
    launcher = LocalLauncher(work_root=tmp_path)
    handle = launcher.submit(job, launcher.plan(job, "ddp-hostile"), extra_env={})
    wait_for_job(launcher, handle, lambda line: None, timeout=120)
    outputs = handle.run_dir / "replicas" / "node-0" / "outputs"
    for rank in (0, 1):
        assert json.loads((outputs / f"argv-{rank}.json").read_text()) == HOSTILE_ARGUMENTS
    assert not PWNED.exists()
