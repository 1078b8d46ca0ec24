"""How a Kubernetes launcher's pods are made whatever the run - KubernetesPodOperator's knobs for every
pod and per role, a pod template, gang scheduling, the inputs cache claim - and the settings one run's
pods are rendered with."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_dnntrain.backends.common.bundle import default_image
from airflow_provider_dnntrain.backends.common.environment_images import ImageBuilding, Registry
from airflow_provider_dnntrain.backends.kubernetes.inputs import input_volumes
from airflow_provider_dnntrain.backends.kubernetes.manifests import Gang, RunSettings, job_name
from airflow_provider_dnntrain.backends.kubernetes.options import GangScheduler, PodOptions, to_api_json
from airflow_provider_dnntrain.spec import TrainingJob
from airflow_provider_dnntrain.topology import JobPlan

DEADLINE_MARGIN_SECONDS = 600  # the pods' deadline past the task's time limit


@dataclass(frozen=True)
class PodDefaults:
    python: str  # the image's interpreter, unless the job's environment names one
    options: PodOptions = field(default_factory=PodOptions)
    role_options: Mapping[str, PodOptions] = field(default_factory=dict)
    pod_template_file: str | None = None
    full_pod_spec: Any = None
    gang: Gang | None = None
    inputs_cache_claim: str | None = None
    building: ImageBuilding | None = None  # where environment images are built and pushed

    @classmethod
    def from_arguments(
        cls,
        *,
        role_options: Mapping[str, PodOptions | Mapping[str, Any]] | None,
        gang_scheduling: GangScheduler | None,
        queue_name: str | None,
        pod_options: Mapping[str, Any],
        **fields: Any,
    ) -> PodDefaults:
        """From the launcher's arguments; ``ValueError`` naming an option that is not one."""
        try:
            options = PodOptions(**pod_options)
            roles = {
                role: o if isinstance(o, PodOptions) else PodOptions(**o)
                for role, o in (role_options or {}).items()
            }
        except Exception as error:  # pydantic names the field
            raise ValueError(f"kubernetes launcher: {error}") from None
        gang = Gang(gang_scheduling, queue_name) if gang_scheduling else None
        return cls(options=options, role_options=roles, gang=gang, **fields)

    def interpreter(self, job: TrainingJob) -> str:
        return job.environment.python or self.python

    def check_environment(self, job: TrainingJob) -> None:
        if job.environment.has_packages and self.building is None:
            raise ValueError(
                "environment.pip_packages: Kubernetes replicas run an image; give the launcher a registry "
                "to build the environment's image in (image_registry=, or docker_conn_id=), or name an "
                "image that has the packages in environment.image"
            )

    def image(self, job: TrainingJob) -> str:
        """The pods' image: the job's environment's (built by :meth:`build_image`), else the base."""
        base = job.environment.image or self.options.image or default_image(job)
        if job.environment.has_packages and self.building is not None:
            return self.building.tag(job, base, self.interpreter(job))
        return base

    def build_image(self, job: TrainingJob) -> None:
        """The job's environment image built and pushed, unless the registry has it already."""
        if job.environment.has_packages and self.building is not None:
            base = job.environment.image or self.options.image or default_image(job)
            self.building.ensure(job, base, self.interpreter(job))

    def run_settings(
        self,
        job: TrainingJob,
        plan: JobPlan,
        namespace: str,
        launch_env: Mapping[str, str],
        grace: float,
        orphan_timeout: float | None = None,
        time_limit: float | None = None,
    ) -> RunSettings:
        """What the run's pods are rendered with (``grace``: their termination grace period). The task
        ends the job at its ``time_limit``; the pods' own deadline is the backstop for when no task is
        left, with time after it to stop gracefully and copy the outputs."""
        volumes, mounts = input_volumes(job, job_name(plan.run_id), self.inputs_cache_claim)
        return RunSettings(
            namespace=namespace,
            image=self.image(job),
            python=self.interpreter(job),
            options=self.options,
            role_options=self.role_options,
            launch_env=dict(launch_env),
            secret_names=sorted(job.environment.secrets),
            use_gpu=job.resources.use_gpu,
            cpu=job.resources.cpu,
            memory=job.resources.memory,
            grace_seconds=int(grace),
            gang=self.gang,
            pod_template=self._pod_template(),
            input_volumes=volumes,
            input_mounts=mounts,
            orphan_timeout=orphan_timeout,
            active_deadline=math.ceil(time_limit + DEADLINE_MARGIN_SECONDS) if time_limit else None,
            pull_secret=self._pulling_registry(job) is not None,
        )

    def pull_config(self, job: TrainingJob) -> str:
        """The run's pull Secret's ``.dockerconfigjson``: the credentials of the registry the job's
        environment image is pushed to ("" when the pods pull it without any)."""
        registry = self._pulling_registry(job)
        return registry.docker_config_json() if registry else ""

    def _pulling_registry(self, job: TrainingJob) -> Registry | None:
        if not job.environment.has_packages or self.building is None:
            return None
        registry = self.building.registry()
        return registry if registry and registry.auth_config else None

    def _pod_template(self) -> dict | None:
        if self.full_pod_spec is not None:
            return to_api_json(self.full_pod_spec)
        if self.pod_template_file:
            import yaml

            return yaml.safe_load(Path(self.pod_template_file).read_text())
        return None
