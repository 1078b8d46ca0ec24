"""A training loop that logs a metric after every batch and ends without ending its MLflow run, as
many scripts do (tests and benchmarks/metric_logging.py); says how long its loop took, also in
``outputs/loop.txt``. Usage: log_every_batch.py BATCHES BATCH_MS"""

import os
import sys
import time
from pathlib import Path

import mlflow

batches, seconds = int(sys.argv[1]), float(sys.argv[2]) / 1000
started, logging = time.perf_counter(), 0.0
for batch in range(batches):
    busy = time.perf_counter() + seconds
    while time.perf_counter() < busy:  # the batch's work
        pass
    logging_started = time.perf_counter()
    mlflow.log_metric("loss", 1.0 / (batch + 1), step=batch)
    logging += time.perf_counter() - logging_started
    if batch == 0:  # the first call also starts the run in MLflow: it waits for the store to answer
        first = time.perf_counter() - logging_started
loop = time.perf_counter() - started
took = f"loop_seconds={loop:.3f} logging_seconds={logging:.3f} first_call={first:.3f}"
print(took, flush=True)
outputs = Path(os.environ.get("DNNTRAIN_OUTPUT_DIR", "outputs"))
outputs.mkdir(parents=True, exist_ok=True)
(outputs / "loop.txt").write_text(took)
