"""PyTorch DDP across SSH hosts (2 nodes x 1 process, torchrun) on the digits data, then registration.

The same task as ``dnntrain_pytorch_ddp`` with only ``launcher=`` changed. The hosts come from the
Airflow connection ``dnntrain_ssh_hosts``: one SSH connection whose extra lists them, e.g.

    {"hosts": [{"host": "gpu-a.lan", "host_key": "ssh-ed25519 AAAA..."},
               {"host": "gpu-b.lan", "host_key": "ssh-ed25519 AAAA..."}],
     "key_file": "/home/airflow/.ssh/id_ed25519"}

(or one connection per host: ``ssh_conn_ids=["gpu_a", "gpu_b"]``). Host keys are verified: pinned
as above, or in the worker's ``~/.ssh/known_hosts``. ``make demo DEMO_DAG=dnntrain_ssh_pytorch_ddp``
runs it against three sshd hosts started on this machine (``scripts/with_ssh_hosts.py``).
"""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import DAG, Param

from airflow_provider_dnntrain.launchers import SSHLauncher
from airflow_provider_dnntrain.operators import PyTorchTrainOperator, RegisterModelOperator
from airflow_provider_dnntrain.spec import TorchDistributed

SCRIPTS = str(Path(__file__).parent / "scripts")

with DAG(
    dag_id="dnntrain_ssh_pytorch_ddp",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={"epochs": Param(3, type="integer", minimum=1), "lr": Param(0.05, type="number")},
    tags=["dnntrain", "pytorch", "ssh"],
) as dag:
    train = PyTorchTrainOperator(
        task_id="train",
        source_directory=SCRIPTS,
        entry_script="torch_ddp_digits.py",
        arguments=["--epochs", "{{ params.epochs }}", "--lr", "{{ params.lr }}"],
        distribution=TorchDistributed(node_count=2, process_count_per_node=1),
        launcher=SSHLauncher(ssh_conn_ids="dnntrain_ssh_hosts"),
    )
    register = RegisterModelOperator(
        task_id="register",
        run_id=train.output,
        model_name="digits-pytorch-ddp-ssh",
        model_path="model",
        tags={"dataset": "sklearn-digits"},
    )
