"""Azure ML estimator argument names the training operators accept, where they map cleanly onto ours;
for those that do not, an error that says what to use instead (Azure ML SDK v1's ``TensorFlow`` and
``PyTorch`` estimators are what users bring)."""

from __future__ import annotations

from typing import Any

from airflow_provider_dnntrain.spec import (
    Horovod,
    ParameterServer,
    SingleNode,
    TorchDistributed,
)

# Azure's names that have a clean equivalent here: ours.
RENAMED = {
    "script_params": "arguments",
    "max_run_duration_seconds": "job_timeout",
}
# Ours, by the Azure name a user gave for it (to say which of the two to drop).
AZURE_NAMES = {
    "arguments": "script_params",
    "job_timeout": "max_run_duration_seconds",
    "distribution": "distributed_backend",
}
DISTRIBUTION_NAMES = (
    "distributed_backend",
    "node_count",
    "process_count_per_node",
    "worker_count",
    "parameter_server_count",
)
_ENVIRONMENT = (
    "give the job an environment that has them: environment={'python': <an interpreter with them>} on "
    "local or SSH hosts, {'image': <an image with them>} on Kubernetes"
)
NOT_MAPPED = {
    "compute_target": "choose where the job runs with launcher= (LocalLauncher, SSHLauncher or "
    "KubernetesLauncher)",
    "pip_packages": _ENVIRONMENT,
    "conda_packages": _ENVIRONMENT,
    "pip_requirements_file": _ENVIRONMENT,
    "conda_dependencies_file": _ENVIRONMENT,
    "environment_definition": "use environment= (python, image, variables, secrets)",
    "framework_version": "the framework is the version installed in the job's environment (python= or "
    "image=)",
    "distributed_training": "use distribution= (ParameterServer, MultiWorkerMirrored, TorchDistributed, "
    "Horovod) or distributed_backend= with node_count= / process_count_per_node=",
    "shm_size": "give Kubernetes pods a memory-backed emptyDir at /dev/shm (volumes=, volume_mounts=); "
    "local and SSH processes use the host's",
    "custom_docker_image": "use environment={'image': ...} (Kubernetes replicas' image)",
}
_BACKENDS = {
    "pytorch": {"nccl": TorchDistributed, "gloo": TorchDistributed, "mpi": Horovod},
    "tensorflow": {"ps": ParameterServer, "parameter_server": ParameterServer, "mpi": Horovod},
}


class AzureArgumentError(ValueError):
    pass


def take_azure_arguments(framework: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove Azure's estimator arguments from ``kwargs``; what they mean in our operator's arguments.
    ``AzureArgumentError`` names one that has no equivalent, and says what to use."""
    for name, instead in NOT_MAPPED.items():
        if name in kwargs:
            raise AzureArgumentError(
                f"{name}: Azure ML's estimator argument has no equivalent here; {instead}"
            )
    ours = {RENAMED[name]: kwargs.pop(name) for name in list(kwargs) if name in RENAMED}
    given = {name: kwargs.pop(name) for name in DISTRIBUTION_NAMES if name in kwargs}
    if given:
        ours["distribution"] = azure_distribution(framework, **given)
    return ours


def azure_distribution(
    framework: str,
    distributed_backend: str | None = None,
    node_count: int = 1,
    process_count_per_node: int = 1,
    worker_count: int = 1,
    parameter_server_count: int = 1,
):
    """The topology Azure's ``distributed_backend`` and counts asked for."""
    backends = _BACKENDS[framework]
    if distributed_backend is None:
        if node_count == 1 and process_count_per_node == 1:
            return SingleNode()
        raise AzureArgumentError(
            f"distributed_backend: node_count={node_count}, process_count_per_node={process_count_per_node} "
            f"needs one of {', '.join(repr(b) for b in backends)}"
        )
    model = backends.get(distributed_backend.lower())
    if model is None:
        raise AzureArgumentError(
            f"distributed_backend: {distributed_backend!r} is not a {framework} backend here; "
            f"use one of {', '.join(repr(b) for b in backends)}"
        )
    if model is ParameterServer:
        return ParameterServer(worker_count=worker_count, parameter_server_count=parameter_server_count)
    if model is Horovod:  # Azure's 'mpi' ran Horovod under Open MPI's mpirun
        counts = {"node_count": node_count, "process_count_per_node": process_count_per_node}
        return Horovod(runner="mpirun", controller="mpi", **counts)
    # 'nccl' / 'gloo' is the script's init_process_group backend; torchrun starts the processes either way.
    return TorchDistributed(node_count=node_count, process_count_per_node=process_count_per_node)
