"""Typed description of a training job: what the user asks for, validated, with no I/O."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

Framework = Literal["tensorflow", "pytorch"]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SingleNode(_Spec):
    """One replica, no distribution environment."""

    kind: Literal["single"] = "single"


class ParameterServer(_Spec):
    """TensorFlow parameter-server training (``distributed_backend='ps'``)."""

    kind: Literal["parameter_server"] = "parameter_server"
    worker_count: int = Field(1, ge=1)
    parameter_server_count: int = Field(1, ge=1)
    chief: bool = True
    evaluator: bool = False
    port: int = Field(2222, ge=1, le=65535)


class MultiWorkerMirrored(_Spec):
    """TensorFlow ``MultiWorkerMirroredStrategy``: N workers, worker 0 acts as chief."""

    kind: Literal["multi_worker_mirrored"] = "multi_worker_mirrored"
    worker_count: int = Field(2, ge=1)
    port: int = Field(2222, ge=1, le=65535)


class TorchDistributed(_Spec):
    """PyTorch DDP started by ``torchrun`` on every node."""

    kind: Literal["torch_distributed"] = "torch_distributed"
    node_count: int = Field(1, ge=1)
    process_count_per_node: int = Field(1, ge=1)
    rendezvous: Literal["static", "c10d"] = "static"
    min_nodes: int | None = Field(None, ge=1, description="elastic lower bound; c10d rendezvous only")
    max_restarts: int = Field(0, ge=0)
    port: int = Field(29500, ge=1, le=65535)

    @model_validator(mode="after")
    def _elastic_needs_c10d(self) -> TorchDistributed:
        if self.min_nodes is not None:
            if self.rendezvous != "c10d":
                raise ValueError("min_nodes (elastic training) requires rendezvous='c10d'")
            if self.min_nodes > self.node_count:
                raise ValueError("min_nodes must not exceed node_count")
        return self


class Horovod(_Spec):
    """Horovod (``distributed_backend='mpi'``): node_count x process_count_per_node ranks, all started by
    one launcher process on the first node, either ``horovodrun`` (Gloo or MPI controller) or Open MPI's
    ``mpirun`` directly."""

    kind: Literal["horovod"] = "horovod"
    node_count: int = Field(1, ge=1)
    process_count_per_node: int = Field(1, ge=1)
    runner: Literal["horovodrun", "mpirun"] = "horovodrun"
    controller: Literal["gloo", "mpi"] = "gloo"
    network_interface: str | None = Field(None, description="interface MPI/Gloo traffic uses, e.g. eth0")
    oversubscribe: bool = Field(False, description="allow more ranks than cores (mpirun)")
    ssh_port: int | None = Field(None, ge=1, le=65535)

    @model_validator(mode="after")
    def _mpirun_means_mpi(self) -> Horovod:
        if self.runner == "mpirun" and self.controller != "mpi":
            raise ValueError("runner='mpirun' starts ranks with Open MPI: set controller='mpi'")
        return self

    @property
    def world_size(self) -> int:
        return self.node_count * self.process_count_per_node


Distribution = Annotated[
    SingleNode | ParameterServer | MultiWorkerMirrored | TorchDistributed | Horovod,
    Field(discriminator="kind"),
]

SUPPORTED_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "tensorflow": ("single", "parameter_server", "multi_worker_mirrored", "horovod"),
    "pytorch": ("single", "torch_distributed", "horovod"),
}


class Environment(_Spec):
    """The software a job runs with and the variables every replica sees."""

    python: str | None = Field(None, description="interpreter for local/SSH replicas; default: Airflow's own")
    image: str | None = Field(None, description="container image for Kubernetes replicas")
    variables: dict[str, str] = Field(default_factory=dict)
    secrets: dict[str, SecretStr] = Field(
        default_factory=dict, description="variables whose values never appear in plans or logs"
    )
    pip_packages: list[str] = Field(
        default_factory=list, description="added to the interpreter's packages (local/SSH: a cached venv)"
    )
    requirements_file: str | None = Field(
        None, description="a requirements file, relative to source_directory"
    )

    @field_validator("pip_packages")
    @classmethod
    def _requirements_only(cls, value: list[str]) -> list[str]:
        for item in value:  # a value from dag_run.conf must not become an installer option
            if not item.strip() or item.lstrip().startswith("-") or any(c in item for c in "\n\r"):
                raise ValueError(f"{item!r} is not a package requirement (such as 'name==1.2')")
        return value

    @property
    def has_packages(self) -> bool:
        return bool(self.pip_packages or self.requirements_file)

    @field_validator("variables", "secrets")
    @classmethod
    def _valid_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return value


class Resources(_Spec):
    use_gpu: bool = False
    cpu: float | None = Field(None, gt=0)
    memory: str | None = Field(None, pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$")


class ResourceConfiguration(_Spec):
    """What a registered model needs to serve (Azure ML's name and fields): kept on the version,
    the default resources of its deployments."""

    cpu: float | None = Field(None, gt=0, description="CPU cores")
    memory_in_gb: float | None = Field(None, gt=0)
    gpu: int | None = Field(None, ge=0)


class Input(_Spec):
    """Data the job reads. Its location reaches the script as ``DNNTRAIN_INPUT_<NAME>`` and, if
    ``argument`` is set, as ``<argument> <path>`` on the command line.

    ``uri`` with ``mode="download"`` (the default): anything Airflow's ``ObjectStoragePath`` reads
    (``s3://``, ``gs://``, ``file://``, ``http(s)://``...; ``conn_id`` names the connection with its
    credentials), a file or a folder (an ``http(s)`` folder ends with ``/``), fetched once per host into
    a cache keyed by the source and its version, and given to the script as a local path ending with the
    URI's last name. ``mode="mount"``: a path passed as is, ``file://`` or a plain path on a shared
    filesystem, or ``pvc://<claim>/<path>`` on Kubernetes. ``path`` alone: a path as is (``mount``).
    """

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    uri: str | None = Field(None, min_length=1)
    mode: Literal["download", "mount"] | None = None
    conn_id: str | None = None
    path: str | None = Field(None, min_length=1, description="where replicas find it (set for downloads)")
    argument: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Input:
        if self.uri is None:
            if self.path is None:
                raise ValueError(f"inputs.{self.name}: give a uri (or a path)")
            if self.mode == "download":
                raise ValueError(f"inputs.{self.name}.mode: 'download' needs a uri to download from")
            return self
        if "{{" in self.uri:  # a template, checked once rendered
            return self
        if self.leaf in (".", ".."):
            raise ValueError(f"inputs.{self.name}.uri: {self.uri!r} must end with a name, not {self.leaf!r}")
        scheme = self.scheme
        if self.mode == "mount":
            if scheme not in ("", "file", "pvc"):
                raise ValueError(
                    f"inputs.{self.name}.mode: 'mount' passes a path as is (file:// or a plain path on a "
                    f"shared filesystem, pvc://<claim>/<path> on Kubernetes); {scheme}:// is read with "
                    "mode='download'"
                )
            if scheme == "pvc" and not urlsplit(self.uri).netloc:
                raise ValueError(
                    f"inputs.{self.name}.uri: {self.uri!r} names no claim (pvc://<claim>/<path>)"
                )
        elif scheme in ("", "pvc"):
            raise ValueError(
                f"inputs.{self.name}.uri: {self.uri!r} is not a URI to download from (such as "
                "s3://bucket/key or file:///data/x); a path on a shared filesystem or volume is given "
                "with mode='mount'"
            )
        return self

    @property
    def scheme(self) -> str:
        return urlsplit(self.uri or "").scheme.lower()

    @property
    def downloads(self) -> bool:
        return self.uri is not None and self.mode != "mount"

    @property
    def leaf(self) -> str:
        """The name the downloaded file or folder keeps (the URI's last one)."""
        return PurePosixPath(urlsplit(self.uri or "").path).name or "data"

    def replica_path(self) -> str | None:
        """Where the script finds it, as far as the job says: None until a launcher places a download or
        a claim."""
        if self.path is not None or self.uri is None:
            return self.path
        if self.downloads or self.scheme == "pvc":
            return None
        return urlsplit(self.uri).path if self.scheme == "file" else self.uri


Arguments = list[str] | dict[str, str | None]
RESUME_FOLDER = "resume"  # where an earlier run's outputs are, in every replica's working directory


class TrainingJob(_Spec):
    framework: Framework
    source_directory: str = Field(min_length=1)
    entry_script: str = Field(min_length=1)
    arguments: Arguments = Field(default_factory=list)
    distribution: Distribution = Field(default_factory=SingleNode)
    environment: Environment = Field(default_factory=Environment)
    resources: Resources = Field(default_factory=Resources)
    inputs: list[Input] = Field(default_factory=list)
    azureml_compat: bool = Field(
        False, description="scripts written for Azure ML import azureml.core.Run, mapped to the tracking run"
    )
    resume_from: str | None = Field(
        None, description="a folder here with an earlier run's outputs, shipped to every replica as ./resume"
    )
    resume_argument: str | None = Field(None, description="the script's flag for that folder, e.g. --resume")

    @field_validator("entry_script")
    @classmethod
    def _relative_script(cls, value: str) -> str:
        path = PurePosixPath(value)
        if path.is_absolute() or ".." in path.parts:
            raise ValueError("must be a path inside source_directory (relative, no '..')")
        return value

    @field_validator("arguments", mode="before")
    @classmethod
    def _stringify_arguments(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [_argument_str(item) for item in value]
        if isinstance(value, dict):
            return {str(k): None if v is None else _argument_str(v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _framework_supports_distribution(self) -> TrainingJob:
        kind = self.distribution.kind
        if kind not in SUPPORTED_DISTRIBUTIONS[self.framework]:
            raise ValueError(
                f"distribution: {kind!r} is not a {self.framework} topology; "
                f"use one of {', '.join(SUPPORTED_DISTRIBUTIONS[self.framework])}"
            )
        names = [item.name for item in self.inputs]
        if len(names) != len(set(names)):
            raise ValueError("inputs: names must be unique")
        return self

    def with_inputs_in(self, folder: str) -> TrainingJob:
        """The job with each downloaded input's path: ``<folder>/<name>/<leaf>`` (a launcher's choice of
        folder, on the hosts its replicas run on)."""
        placed = [
            item.model_copy(update={"path": f"{folder.rstrip('/')}/{item.name}/{item.leaf}"})
            if item.downloads
            else item
            for item in self.inputs
        ]
        return self.model_copy(update={"inputs": placed})

    def argv(self) -> list[str]:
        """The script's command-line arguments, literal, in order."""
        if isinstance(self.arguments, dict):
            flat: list[str] = []
            for flag, value in self.arguments.items():
                flat.append(flag)
                if value is not None:
                    flat.append(value)
        else:
            flat = list(self.arguments)
        for item in self.inputs:
            if item.argument:
                flat += [item.argument, item.replica_path() or ""]
        if self.resume_from and self.resume_argument:
            flat += [self.resume_argument, RESUME_FOLDER]
        return flat


def _argument_str(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ValueError(f"arguments must be strings or numbers, got {type(value).__name__}")
