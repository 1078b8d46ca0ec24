"""The operators a DAG uses: train (TensorFlow, PyTorch, Horovod), register the model, deploy it."""

from airflow_provider_dnntrain.operators.deploy import DeployModelOperator, UndeployModelOperator
from airflow_provider_dnntrain.operators.register import RegisterModelOperator
from airflow_provider_dnntrain.operators.train import (
    DnnTrainOperator,
    InvalidTrainingJob,
    PyTorchHorovodOperator,
    PyTorchTrainOperator,
    TensorFlowTrainOperator,
)

__all__ = [
    "DeployModelOperator",
    "DnnTrainOperator",
    "InvalidTrainingJob",
    "PyTorchHorovodOperator",
    "PyTorchTrainOperator",
    "RegisterModelOperator",
    "TensorFlowTrainOperator",
    "UndeployModelOperator",
]
