"""What every backend gives a replica's processes: the reaper they run under, the replica site that
leads their ``PYTHONPATH``, and the variables and files by which the replica site, the reaper and the
backends find each other."""

from __future__ import annotations

from pathlib import Path

from airflow_provider_dnntrain.backends.common import reaper

# What every backend runs a replica under: reaper.py, and replica_site/ leading its PYTHONPATH (that
# sitecustomize runs first in each of the replica's interpreters).
REAPER = Path(reaper.__file__)
REPLICA_SITE = Path(__file__).resolve().parents[2] / "replica_site"
REPLICA_SITE_MODULES = ("sitecustomize.py", "azureml_compat.py")  # what a remote backend ships of it
# Every process of a launch carries this variable: how a stop finds what escaped every other net.
LAUNCH_ID_VAR = "DNNTRAIN_LAUNCH_ID"
# How the replica site knows the script's processes, which of them is the primary one (global rank 0,
# else the chief) and what they await.
ENTRY_SCRIPT_VAR = "DNNTRAIN_ENTRY_SCRIPT"
PRIMARY_REPLICA_VAR = "DNNTRAIN_PRIMARY_REPLICA"
# Written by the primary process into its working directory: where the run's outputs are.
PRIMARY_MARKER = ".dnntrain-primary"
PENDING_ENV_VAR = "DNNTRAIN_PENDING_ENV"
PENDING_FILE_VAR = "DNNTRAIN_PENDING_ENV_FILE"
# In the chief's logs/, so that the run's tracking keeps it: the packages a job's environment resolved to.
ENVIRONMENT_RECORD = "environment.txt"


def launch_env(launch_id: str, entry_script: str, primary_replica: str) -> dict[str, str]:
    """The variables every backend gives every replica of a launch, besides the plan's own."""
    return {
        "PYTHONUNBUFFERED": "1",
        LAUNCH_ID_VAR: launch_id,
        ENTRY_SCRIPT_VAR: entry_script,
        PRIMARY_REPLICA_VAR: primary_replica,
    }
