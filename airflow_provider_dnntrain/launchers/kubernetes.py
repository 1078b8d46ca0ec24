"""Where ``KubernetesLauncher`` was imported from before the backends had packages; it lives in
``backends/kubernetes/`` now (``from airflow_provider_dnntrain.launchers import KubernetesLauncher``)."""

from airflow_provider_dnntrain.backends.kubernetes.launcher import KubernetesLauncher

__all__ = ["KubernetesLauncher"]
