"""The rendered job: every replica with its role, ranks, address, environment and argv."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

from airflow_provider_dnntrain.spec import RESUME_FOLDER, TrainingJob

SuccessPolicy = Literal["chief", "all"]

# Variables the project sets for every replica; scripts may rely on them.
RUN_ID_VAR = "DNNTRAIN_RUN_ID"
ROLE_VAR = "DNNTRAIN_ROLE"
INDEX_VAR = "DNNTRAIN_REPLICA_INDEX"
OUTPUT_DIR_VAR = "DNNTRAIN_OUTPUT_DIR"
LOG_DIR_VAR = "DNNTRAIN_LOG_DIR"
AZUREML_COMPAT_VAR = "DNNTRAIN_AZUREML_COMPAT"  # the replica site provides azureml.core.Run
RESUME_VAR = "DNNTRAIN_RESUME_FROM"  # an earlier run's outputs, to continue from
# Set by launchers for every replica: what the replica's processes need to find their own way.
LAUNCHER_VARS = (
    "DNNTRAIN_LAUNCH_ID",
    "DNNTRAIN_ENTRY_SCRIPT",
    "DNNTRAIN_PRIMARY_REPLICA",
    "DNNTRAIN_PENDING_ENV",
    "DNNTRAIN_PENDING_ENV_FILE",
)
# Set by the operator at submit when tracking is on; listed so launchers can forward them.
TRACKING_VARS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_RUN_ID",
    "MLFLOW_EXPERIMENT_ID",
    "DNNTRAIN_TRACKING_RUN_ID",
)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Placement(Protocol):
    """Where each replica lives: the backend decides hosts and ports, topology decides the rest."""

    def endpoint(self, role: str, index: int, default_port: int) -> Endpoint: ...

    # Whether replicas run as root there (Open MPI refuses root unless told).
    runs_as_root: bool


class FixedPortPlacement:
    """Every replica listens on the topology's default port of a host named by ``host_of``."""

    def __init__(self, host_of=lambda role, index: "127.0.0.1", runs_as_root: bool = False) -> None:
        self._host_of = host_of
        self.runs_as_root = runs_as_root

    def endpoint(self, role: str, index: int, default_port: int) -> Endpoint:
        return Endpoint(self._host_of(role, index), default_port)


@dataclass(frozen=True)
class Replica:
    role: str
    index: int
    host: str
    port: int | None
    argv: list[str]
    env: dict[str, str]
    ranks: list[int] = field(default_factory=list)
    decides_success: bool = False
    runs_until_stopped: bool = False
    files: dict[str, str] = field(default_factory=dict)  # written into the working directory first
    # Folder (relative to the working directory) where the command writes one rank.N/stdout|stderr
    # per rank; launchers stream those instead of relying on the command's interleaved console.
    rank_logs: str | None = None

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


@dataclass(frozen=True)
class JobPlan:
    run_id: str
    framework: str
    distribution: str
    success_policy: SuccessPolicy
    replicas: list[Replica]
    world_size: int
    secret_names: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)  # Horovod nodes, first one runs the launcher

    def replica(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    @property
    def chief(self) -> Replica:
        """The replica whose ``./outputs`` are the run's outputs."""
        deciding = [r for r in self.replicas if r.decides_success]
        return deciding[0] if deciding else self.replicas[0]

    def to_dict(self) -> dict:
        data = asdict(self)
        for replica in data["replicas"]:
            replica["name"] = f"{replica['role']}-{replica['index']}"
            replica["env"].update({name: "***" for name in self.secret_names})
        return data

    @classmethod
    def from_dict(cls, data: dict) -> JobPlan:
        """The plan :meth:`to_dict` gave (secrets stay masked: they never travel in a plan)."""
        fields = {**data}
        fields["replicas"] = [
            Replica(**{k: v for k, v in replica.items() if k != "name"}) for replica in data["replicas"]
        ]
        return cls(**fields)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def base_env(job: TrainingJob, run_id: str, role: str, index: int) -> dict[str, str]:
    env = dict(job.environment.variables)
    env.update({RUN_ID_VAR: run_id, ROLE_VAR: role, INDEX_VAR: str(index)})
    env.update({OUTPUT_DIR_VAR: "outputs", LOG_DIR_VAR: "logs"})
    for item in job.inputs:
        env[f"DNNTRAIN_INPUT_{item.name.upper()}"] = item.replica_path() or ""
    if job.azureml_compat:
        env[AZUREML_COMPAT_VAR] = "1"
    if job.resume_from:
        env[RESUME_VAR] = RESUME_FOLDER
    return env


def script_argv(job: TrainingJob, python: str) -> list[str]:
    return [python, job.entry_script, *job.argv()]
