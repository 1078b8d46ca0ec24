"""Where ``LocalLauncher`` was imported from before the backends had packages; it lives in
``backends/local/`` now (``from airflow_provider_dnntrain.launchers import LocalLauncher``)."""

from airflow_provider_dnntrain.backends.local.launcher import LocalLauncher

__all__ = ["LocalLauncher"]
