"""Runs at the start of every Python process of a replica (this folder leads the replicas' PYTHONPATH).

Variables the launcher was told are pending (the tracking run's id, created while the replicas start)
are awaited by the processes that run the job's script, before any of its code: they find them set
like any other. Runners (torchrun, horovodrun) do not wait, so their ranks usually find them ready.

Rank 0 of the primary replica (the chief) logs to the training run, as ``MLFLOW_RUN_ID`` says. Every
other process - other replicas, other ranks started by torchrun, horovodrun or mpirun - gets no
``MLFLOW_RUN_ID`` but an ``MLFLOW_RUN_CONTEXT``, so that its first ``mlflow`` call opens a child run
of its own (named after its replica and rank) instead of mixing its metrics into the chief's.

Standard library only, and then hands over to any other ``sitecustomize`` further down the path.
"""

import json
import os
import sys
import time

_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMI_RANK", "RANK")
_PENDING_WAIT_SECONDS = 600  # the launcher stops the job long before, if the values never come


def _await_pending_env() -> None:
    names = [name for name in os.environ.get("DNNTRAIN_PENDING_ENV", "").split(",") if name]
    path = os.environ.get("DNNTRAIN_PENDING_ENV_FILE")
    if not names or not path or all(name in os.environ for name in names):
        return
    if not sys.argv or sys.argv[0] != os.environ.get("DNNTRAIN_ENTRY_SCRIPT"):
        return  # a runner, or another tool: it passes the variables on as they are
    deadline = time.monotonic() + _PENDING_WAIT_SECONDS
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            print(f"dnntrain: {', '.join(names)} never arrived; starting without them", file=sys.stderr)
            return
        time.sleep(0.02)
    with open(path) as pending:
        values = json.load(pending)
    os.environ.update({name: values[name] for name in names if name in values})


def _route_tracking() -> None:
    parent = os.environ.get("DNNTRAIN_TRACKING_RUN_ID")
    primary = os.environ.get("DNNTRAIN_TRACKING_PRIMARY")
    if not parent or not primary:
        return
    replica = f"{os.environ.get('DNNTRAIN_ROLE', '')}-{os.environ.get('DNNTRAIN_REPLICA_INDEX', '')}"
    rank = next((os.environ[name] for name in _RANK_VARIABLES if name in os.environ), None)
    if replica == primary and rank in (None, "0"):
        os.environ["MLFLOW_RUN_ID"] = parent
        os.environ.pop("MLFLOW_RUN_CONTEXT", None)
        return
    label = replica if rank is None else f"{replica}-rank{rank}"
    os.environ.pop("MLFLOW_RUN_ID", None)
    run_name = f"{os.environ.get('DNNTRAIN_RUN_ID', parent)}-{label}"
    tags = {"mlflow.parentRunId": parent, "mlflow.runName": run_name, "dnntrain.replica": label}
    os.environ["MLFLOW_RUN_CONTEXT"] = json.dumps(tags)


def _hand_over() -> None:
    """Run the ``sitecustomize`` this one shadows, if there is one."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    path = [entry for entry in sys.path if os.path.abspath(entry or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        sys.modules["sitecustomize"] = module
        spec.loader.exec_module(module)


_await_pending_env()
_route_tracking()
_hand_over()
