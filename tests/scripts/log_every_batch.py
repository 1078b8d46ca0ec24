"""A training loop that logs a metric after every batch and ends without ending its MLflow run, as
many scripts do (tests and benchmarks/metric_logging.py). Usage: log_every_batch.py BATCHES BATCH_MS"""

import sys
import time

import mlflow

batches, seconds = int(sys.argv[1]), float(sys.argv[2]) / 1000
started = time.perf_counter()
for batch in range(batches):
    busy = time.perf_counter() + seconds
    while time.perf_counter() < busy:  # the batch's work
        pass
    mlflow.log_metric("loss", 1.0 / (batch + 1), step=batch)
print(f"loop_seconds={time.perf_counter() - started:.3f}", flush=True)
