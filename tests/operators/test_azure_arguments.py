"""Azure ML estimator arguments on the training operators: mapped where they map cleanly, else an
error that says what to use (at DAG-parse time, like any invalid job)."""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_provider_dnntrain.operators import (
    InvalidTrainingJob,
    PyTorchTrainOperator,
    TensorFlowTrainOperator,
)
from airflow_provider_dnntrain.spec import Horovod, ParameterServer, TorchDistributed

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_azure_estimator_arguments_map_or_say_what_to_use():
    common = {"task_id": "train", "source_directory": str(SCRIPTS), "entry_script": "ranks.py"}
    train = TensorFlowTrainOperator(
        **common, distributed_backend="ps", worker_count=2, max_run_duration_seconds=60
    )
    assert train.distribution == ParameterServer(worker_count=2, parameter_server_count=1)
    assert train.job_timeout == 60
    torch = PyTorchTrainOperator(**common, distributed_backend="nccl", node_count=2, process_count_per_node=2)
    assert torch.distribution == TorchDistributed(node_count=2, process_count_per_node=2)
    horovod = TensorFlowTrainOperator(**common, distributed_backend="mpi", process_count_per_node=2)
    assert horovod.distribution == Horovod(process_count_per_node=2, runner="mpirun", controller="mpi")
    assert PyTorchTrainOperator(**common, node_count=1).distribution.kind == "single"
    with pytest.raises(
        InvalidTrainingJob, match="compute_target: .* choose where the job runs with launcher="
    ):
        PyTorchTrainOperator(**common, compute_target="gpu-cluster")
    with pytest.raises(InvalidTrainingJob, match=r"pip_packages: .* environment=\{'python'"):
        PyTorchTrainOperator(**common, pip_packages=["torchvision"])
    with pytest.raises(InvalidTrainingJob, match="distributed_backend: 'ps' is not a pytorch backend"):
        PyTorchTrainOperator(**common, distributed_backend="ps")
    with pytest.raises(InvalidTrainingJob, match="distributed_backend: node_count=2, .* needs one of"):
        PyTorchTrainOperator(**common, node_count=2)
    with pytest.raises(InvalidTrainingJob, match="script_params: Azure's name for arguments; give one"):
        PyTorchTrainOperator(**common, arguments=["--a"], script_params={"--b": "1"})
