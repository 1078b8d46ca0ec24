"""Where ``SSHLauncher`` was imported from before the backends had packages; it lives in
``backends/ssh/`` now (``from airflow_provider_dnntrain.launchers import SSHLauncher``)."""

from airflow_provider_dnntrain.backends.ssh.launcher import SSHLauncher

__all__ = ["SSHLauncher"]
