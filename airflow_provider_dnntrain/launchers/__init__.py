"""The launchers a DAG names in ``launcher=``: ``from airflow_provider_dnntrain.launchers import
LocalLauncher, SSHLauncher, KubernetesLauncher, DockerLauncher``; and where models are served, in
``serving=`` of DeployModelOperator: ``LocalServing``, ``SSHServing``, ``KubernetesServing``,
``KServeServing``, ``DockerServing``.

Each lives in its backend's package (``backends/local``, ``ssh``, ``kubernetes``, ``docker``) and
is imported when first named here, so a DAG file that uses one launcher does not pay for the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow_provider_dnntrain.backends.base import Launcher
    from airflow_provider_dnntrain.backends.docker.launcher import DockerLauncher
    from airflow_provider_dnntrain.backends.docker.serving import DockerServing
    from airflow_provider_dnntrain.backends.kubernetes.kserve import KServeServing
    from airflow_provider_dnntrain.backends.kubernetes.launcher import KubernetesLauncher
    from airflow_provider_dnntrain.backends.kubernetes.serving import KubernetesServing
    from airflow_provider_dnntrain.backends.local.launcher import LocalLauncher
    from airflow_provider_dnntrain.backends.local.serving import LocalServing
    from airflow_provider_dnntrain.backends.ssh.launcher import SSHLauncher
    from airflow_provider_dnntrain.backends.ssh.serving import SSHServing

_HOMES = {
    "Launcher": "airflow_provider_dnntrain.backends.base",
    "LocalLauncher": "airflow_provider_dnntrain.backends.local.launcher",
    "SSHLauncher": "airflow_provider_dnntrain.backends.ssh.launcher",
    "KubernetesLauncher": "airflow_provider_dnntrain.backends.kubernetes.launcher",
    "DockerLauncher": "airflow_provider_dnntrain.backends.docker.launcher",
    "LocalServing": "airflow_provider_dnntrain.backends.local.serving",
    "SSHServing": "airflow_provider_dnntrain.backends.ssh.serving",
    "KubernetesServing": "airflow_provider_dnntrain.backends.kubernetes.serving",
    "KServeServing": "airflow_provider_dnntrain.backends.kubernetes.kserve",
    "DockerServing": "airflow_provider_dnntrain.backends.docker.serving",
}
__all__ = [
    "DockerLauncher",
    "DockerServing",
    "KServeServing",
    "KubernetesLauncher",
    "KubernetesServing",
    "Launcher",
    "LocalLauncher",
    "LocalServing",
    "SSHLauncher",
    "SSHServing",
]


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
