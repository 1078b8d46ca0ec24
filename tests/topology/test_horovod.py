from __future__ import annotations

import pytest

from airflow_provider_dnntrain.spec import Horovod, TrainingJob
from airflow_provider_dnntrain.topology import FixedPortPlacement, render_plan

PLACEMENT = FixedPortPlacement(lambda role, index: f"h{index}")
ROOT_PLACEMENT = FixedPortPlacement(lambda role, index: f"h{index}", runs_as_root=True)
SCRIPT = ["python", "train.py", "--epochs", "1"]


def horovod_job(framework="pytorch", **dist) -> TrainingJob:
    return TrainingJob(
        framework=framework,
        source_directory="src",
        entry_script="train.py",
        arguments=["--epochs", "1"],
        distribution=Horovod(**dist),
    )


@pytest.mark.parametrize(
    ("nodes", "slots", "host_list", "hostfile"),
    [
        (1, 1, "h0:1", "h0 slots=1\n"),
        (1, 2, "h0:2", "h0 slots=2\n"),
        (2, 2, "h0:2,h1:2", "h0 slots=2\nh1 slots=2\n"),
        (4, 8, "h0:8,h1:8,h2:8,h3:8", "h0 slots=8\nh1 slots=8\nh2 slots=8\nh3 slots=8\n"),
    ],
)
def test_host_lists_and_world_size(nodes, slots, host_list, hostfile):
    gloo = render_plan(horovod_job(node_count=nodes, process_count_per_node=slots), "r", PLACEMENT, "python")
    (launcher,) = gloo.replicas
    assert launcher.argv == [
        "python", "-m", "horovod.runner.launch",
        "-np", str(nodes * slots), "-H", host_list, "--gloo", *SCRIPT,
    ]  # fmt: skip
    assert gloo.world_size == nodes * slots == len(launcher.ranks)
    assert gloo.hosts == [f"h{i}" for i in range(nodes)]
    assert launcher.host == "h0" and launcher.decides_success

    mpi = horovod_job(node_count=nodes, process_count_per_node=slots, runner="mpirun", controller="mpi")
    (mpirun,) = render_plan(mpi, "r", PLACEMENT, "python").replicas
    assert mpirun.files == {"hostfile": hostfile}
    assert mpirun.argv[:12] == [
        "mpirun", "-np", str(nodes * slots), "--hostfile", "hostfile",
        "-bind-to", "none", "-map-by", "slot", "--output-filename", "logs/ranks:nocopy", "-x",
    ]  # fmt: skip
    assert (mpirun.rank_logs, launcher.rank_logs) == ("logs/ranks", None)
    assert mpirun.argv[-4:] == SCRIPT


def test_mpirun_exports_what_ranks_need_and_allows_root_only_as_root():
    job = TrainingJob(
        framework="tensorflow",
        source_directory="src",
        entry_script="train.py",
        distribution=Horovod(runner="mpirun", controller="mpi", network_interface="eth1", oversubscribe=True),
        environment={"variables": {"MY_VAR": "1"}, "secrets": {"TOKEN": "s"}},
    )
    as_user = render_plan(job, "r", PLACEMENT, "python").replicas[0].argv
    as_root = render_plan(job, "r", ROOT_PLACEMENT, "python").replicas[0].argv
    assert "--allow-run-as-root" not in as_user
    assert as_root[:2] == ["mpirun", "--allow-run-as-root"]
    exported = {as_user[i + 1] for i, arg in enumerate(as_user) if arg == "-x"}
    assert {"PATH", "LD_LIBRARY_PATH", "MY_VAR", "TOKEN", "MLFLOW_RUN_ID", "DNNTRAIN_RUN_ID"} <= exported
    assert "--oversubscribe" in as_user
    mca = [as_user[i + 1 : i + 3] for i, arg in enumerate(as_user) if arg == "-mca"]
    assert mca == [["btl_tcp_if_include", "eth1"], ["oob_tcp_if_include", "eth1"]]


def test_horovodrun_mpi_controller_and_interface():
    job = horovod_job(node_count=2, process_count_per_node=4, controller="mpi", network_interface="eth0")
    argv = render_plan(job, "r", PLACEMENT, "python").replicas[0].argv
    assert argv[:13] == [
        "python", "-m", "horovod.runner.launch", "-np", "8", "-H", "h0:4,h1:4",
        "--mpi", "--output-filename", "logs/ranks:nocopy", "--network-interfaces", "eth0", "python",
    ]  # fmt: skip
