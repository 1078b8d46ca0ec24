"""Apache Airflow provider for distributed TensorFlow and PyTorch training."""

from __future__ import annotations

__version__ = "0.1.0"


def get_provider_info() -> dict:
    return {
        "package-name": "airflow-provider-dnntrain",
        "name": "DNN Train",
        "description": "Distributed TensorFlow and PyTorch training as Airflow tasks, "
        "on local processes, SSH hosts or Kubernetes, with MLflow model registration.",
        "versions": [__version__],
        "filesystems": ["airflow_provider_dnntrain.fs.http"],
        "operators": [
            {
                "integration-name": "DNN Train",
                "python-modules": [
                    "airflow_provider_dnntrain.operators.train",
                    "airflow_provider_dnntrain.operators.register",
                ],
            }
        ],
        "triggers": [
            {
                "integration-name": "DNN Train",
                "python-modules": [
                    "airflow_provider_dnntrain.triggers.ssh",
                    "airflow_provider_dnntrain.triggers.kubernetes",
                ],
            }
        ],
        "connection-types": [],
    }
