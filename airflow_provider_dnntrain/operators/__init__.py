from airflow_provider_dnntrain.operators.register import RegisterModelOperator
from airflow_provider_dnntrain.operators.train import (
    DnnTrainOperator,
    InvalidTrainingJob,
    PyTorchTrainOperator,
    TensorFlowTrainOperator,
)

__all__ = [
    "DnnTrainOperator",
    "InvalidTrainingJob",
    "PyTorchTrainOperator",
    "RegisterModelOperator",
    "TensorFlowTrainOperator",
]
