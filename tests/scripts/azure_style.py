"""A training script as written for Azure ML (SDK v1), unedited: it runs with azureml_compat=True."""

import os
import sys

from azureml.core import Run
from azureml.core.run import Run as RunFromItsModule

run = Run.get_context()
rank = next((os.environ[v] for v in ("OMPI_COMM_WORLD_RANK", "RANK") if v in os.environ), "0")
print(f"azure run {run.id} rank={rank} same_class={Run is RunFromItsModule}", flush=True)
for epoch in range(3):
    run.log("accuracy", 0.5 + 0.1 * epoch + (100 if rank != "0" else 0))
run.log("optimizer", "sgd")  # not a number: kept as a tag
run.log_list("losses", [0.9, 0.5, 0.25])
run.log_row("per_class", klass=1, precision=0.8)
run.log_row("per_class", klass=2, precision=0.6)
run.tag("team", "vision")
with open("notes.txt", "w") as notes:
    notes.write("trained for 3 epochs\n")
run.upload_file("reports/notes.txt", "notes.txt")
os.makedirs("outputs", exist_ok=True)
with open("outputs/model.pkl", "wb") as model:
    model.write(b"weights")
version = run.register_model("azure-style-model", "outputs/model.pkl", tags={"source": "azure"})
print(f"registered {getattr(version, 'version', None)}", flush=True)
print(f"inputs {sorted(run.input_datasets.items())}", flush=True)
try:
    from azureml.core import Workspace  # noqa: F401
except ImportError as error:
    print(f"no Workspace: {error}", file=sys.stderr, flush=True)
