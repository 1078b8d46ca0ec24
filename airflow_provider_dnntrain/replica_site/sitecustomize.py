"""Runs at the start of every Python process of a replica (this folder leads the replicas' PYTHONPATH).

The job's secrets, and variables the launcher was told are pending (the tracking run's id, created
while the replicas start), come from an owner-only file rather than the replica's environment: the
processes that run the job's script load them before any of its code, waiting for those not there
yet, and find them set like any other variable. Runners (torchrun, horovodrun, mpirun) neither wait
nor hold them, so they cannot pass secrets on in command lines; their ranks are script processes.

The primary process - global rank 0 wherever it runs, or the chief replica's process when there are
no ranks - marks its working directory (the run's outputs are collected from there) and logs to the
training run, as ``MLFLOW_RUN_ID`` says. Every other process - other replicas, other ranks started by
torchrun, horovodrun or mpirun - gets no ``MLFLOW_RUN_ID`` but an ``MLFLOW_RUN_CONTEXT``, so that its
first ``mlflow`` call opens a child run of its own (named after its replica and rank) instead of
mixing its metrics into the primary's.

With ``DNNTRAIN_AZUREML_COMPAT=1`` the script's processes can ``from azureml.core import Run``
(azureml_compat.py, beside this file).

Every process writes each line of output whole, in one write, as on a terminal: mpirun tags every
chunk it reads from a rank, so a line written in pieces would reach the log cut in two.

Metrics are logged asynchronously (``MLFLOW_ENABLE_ASYNC_LOGGING``); a script that exits without
ending its run would lose the last batch (MLflow's own flush runs after the interpreter has stopped
taking new work), so every script process flushes MLflow's queue as its main thread ends.

Standard library only, and then hands over to any other ``sitecustomize`` further down the path.
"""

from __future__ import annotations

import contextlib
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
    if not _is_script_process():
        return  # a runner, or another tool: it passes the variables on as they are
    deadline = time.monotonic() + _PENDING_WAIT_SECONDS
    values = _read_json(path)
    while not all(name in values for name in names):
        if time.monotonic() > deadline:
            missing = sorted(set(names) - set(values))
            print(f"dnntrain: {', '.join(missing)} never arrived; starting without them", file=sys.stderr)
            break
        time.sleep(0.02)
        values = _read_json(path)
    os.environ.update({name: values[name] for name in names if name in values})


def _read_json(path: str) -> dict:
    """What the file holds so far: nothing while it is absent or caught half-written."""
    try:
        with open(path) as provided:
            return json.load(provided)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _is_script_process() -> bool:
    return bool(sys.argv) and sys.argv[0] == os.environ.get("DNNTRAIN_ENTRY_SCRIPT")


def _rank() -> str | None:
    return next((os.environ[name] for name in _RANK_VARIABLES if name in os.environ), None)


def _replica() -> str:
    return f"{os.environ.get('DNNTRAIN_ROLE', '')}-{os.environ.get('DNNTRAIN_REPLICA_INDEX', '')}"


def _is_primary() -> bool:
    """Global rank 0 wherever it runs (torchrun's c10d places it on any node); the chief replica for
    processes that have no rank (TensorFlow replicas, single processes, runners)."""
    rank = _rank()
    return rank == "0" if rank is not None else _replica() == os.environ.get("DNNTRAIN_PRIMARY_REPLICA")


def _mark_primary() -> None:
    """The primary script process marks its working directory: the run's outputs are collected there."""
    if _is_script_process() and _is_primary():
        with open(".dnntrain-primary", "w") as marker:
            marker.write(str(os.getpid()))


def _route_tracking() -> None:
    parent = os.environ.get("DNNTRAIN_TRACKING_RUN_ID")
    if not parent:
        return
    if _is_primary():
        os.environ["MLFLOW_RUN_ID"] = parent
        os.environ.pop("MLFLOW_RUN_CONTEXT", None)
        return
    rank = _rank()
    label = _replica() if rank is None else f"{_replica()}-rank{rank}"
    os.environ.pop("MLFLOW_RUN_ID", None)
    run_name = f"{os.environ.get('DNNTRAIN_RUN_ID', parent)}-{label}"
    tags = {"mlflow.parentRunId": parent, "mlflow.runName": run_name, "dnntrain.replica": label}
    os.environ["MLFLOW_RUN_CONTEXT"] = json.dumps(tags)


def _azureml_compat() -> None:
    """``azureml.core.Run`` on the tracking run, for scripts written for Azure ML (opt-in)."""
    if os.environ.get("DNNTRAIN_AZUREML_COMPAT") == "1" and _is_script_process():
        import azureml_compat  # beside this file

        azureml_compat.install(primary=_is_primary())


def _write_whole_lines() -> None:
    """``PYTHONUNBUFFERED`` (set so output streams as it comes) writes ``print``'s text and its newline
    separately; line buffering keeps that promise with one write per line. An explicit flush, as
    progress bars do, still goes out at once."""
    for stream in (sys.stdout, sys.stderr):
        # A stream replaced by something that is not a text file, or closed, is left as it is.
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(line_buffering=True, write_through=False)


def _flush_metrics_at_exit() -> None:
    """Flush MLflow's asynchronous logging when the main thread ends: ``threading``'s exit hooks run
    before ``concurrent.futures`` stops its workers (registered later, this one runs first), where
    ``atexit`` would be too late."""
    if not _is_script_process():
        return
    import concurrent.futures.thread  # noqa: F401 - its exit hook must be registered before ours
    import threading

    def flush() -> None:
        mlflow = sys.modules.get("mlflow")
        if mlflow is not None and hasattr(mlflow, "flush_async_logging"):
            with contextlib.suppress(Exception):
                mlflow.flush_async_logging()

    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(flush)


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


_write_whole_lines()
_await_pending_env()
_mark_primary()
_route_tracking()
_azureml_compat()
_flush_metrics_at_exit()
_hand_over()
