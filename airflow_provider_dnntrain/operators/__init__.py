"""The operators a DAG uses: train (TensorFlow, PyTorch, Horovod) and register the model."""

from airflow_provider_dnntrain.operators.register import RegisterModelOperator
from airflow_provider_dnntrain.operators.train import (
    DnnTrainOperator,
    InvalidTrainingJob,
    PyTorchHorovodOperator,
    PyTorchTrainOperator,
    TensorFlowTrainOperator,
)

__all__ = [
    "DnnTrainOperator",
    "InvalidTrainingJob",
    "PyTorchHorovodOperator",
    "PyTorchTrainOperator",
    "RegisterModelOperator",
    "TensorFlowTrainOperator",
]
