"""A deployed model through its endpoint against the same model served by ``mlflow models serve`` by
hand: requests per second and latency (p50, p99) with the same clients; and how long a deploy takes to
its first answer (a new endpoint, then a new version on a running one) and a rollback.

Not part of the test suite. The model is the digits examples' MLP (64 -> 64 -> 10, TorchScript),
packaged as RegisterModelOperator packages it; the endpoint is LocalServing's (supervisor, relay, key
check, MLflow's scoring server), deployed with the rollout DeployModelOperator uses (probe, smoke test,
switch). The clients are threads that keep one connection each and send 8 rows per request.
Run: .venv/bin/python benchmarks/serving.py [--seconds 10] [--clients 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HOME = Path(tempfile.mkdtemp(prefix="dnntrain-bench-serving-"))
os.environ["AIRFLOW_HOME"] = str(HOME)
BODY = json.dumps({"inputs": [[0.5] * 64] * 8}).encode()
KEY = "benchmark-key"


def make_model(folder: Path, seed: int) -> Path:
    import torch

    from airflow_provider_dnntrain.models.packaging import find_model, package

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    saved = folder / f"saved-{seed}"
    saved.mkdir(parents=True)
    torch.jit.script(net).save(saved / "model.pt")
    (saved / "input_example.json").write_text(json.dumps([[0.1] * 64] * 5))
    package(saved, folder / f"pyfunc-{seed}", find_model(saved))
    return folder / f"pyfunc-{seed}"


def load(port: int, seconds: float, clients: int, key: str | None) -> tuple[float, float, float]:
    """Requests per second, p50 and p99 latency (ms) of ``clients`` threads for ``seconds``."""
    latencies: list[float] = []
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    deadline = time.monotonic() + seconds

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        while time.monotonic() < deadline:
            started = time.perf_counter()
            connection.request("POST", "/invocations", BODY, headers)
            answer = connection.getresponse()
            answer.read()
            assert answer.status == 200, answer.status
            mine.append(time.perf_counter() - started)
        latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ordered = sorted(latencies)
    return len(ordered) / seconds, ordered[len(ordered) // 2] * 1000, ordered[int(len(ordered) * 0.99)] * 1000


def _shown(measured: tuple[float, float, float]) -> str:
    return f"{measured[0]:.0f} req/s p50 {measured[1]:.1f} ms p99 {measured[2]:.1f} ms"


def by_hand(model_dir: Path, port: int) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    argv = [str(mlflow), "models", "serve", "-m", str(model_dir), "--env-manager", "local", "-p", str(port)]
    env = {**os.environ, "PATH": f"{mlflow.parent}:{os.environ['PATH']}"}  # it starts uvicorn from the PATH
    log = open(HOME / "by-hand.log", "wb")  # noqa: SIM115 - the server's, for as long as it runs
    server = subprocess.Popen(argv, env=env, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 120
    while not _answers(port):
        assert time.monotonic() < deadline and server.poll() is None, (HOME / "by-hand.log").read_text()
        time.sleep(0.2)
    return server


def _answers(port: int) -> bool:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        connection.request("GET", "/ping")
        return connection.getresponse().status == 200
    except OSError:
        return False


ENVIRONMENT_REQUIREMENT = "pyjokes==0.8.3"  # small, pure Python, and not among the worker's packages


def timed_deploy(serving, version) -> float:
    from airflow_provider_dnntrain.backends.serving import roll_out
    from airflow_provider_dnntrain.operators import smoke

    started = time.perf_counter()
    with serving.locked("bench"):
        roll_out(
            serving,
            "bench",
            version,
            smoke.key_hash(KEY),
            smoke.check(version.model_dir, KEY, None),
            lambda _: None,
        )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from airflow_provider_dnntrain.backends.common.ports import free_port
    from airflow_provider_dnntrain.backends.local.serving import LocalServing
    from airflow_provider_dnntrain.backends.serving import ServedVersion

    first, second = make_model(HOME / "models", 0), make_model(HOME / "models", 1)
    port = free_port("127.0.0.1", taken=set())
    serving = LocalServing(port=free_port("127.0.0.1", taken={port}))
    v1, v2 = (ServedVersion("bench", str(n), path) for n, path in ((1, first), (2, second)))
    try:
        cold, warm, rollback = timed_deploy(serving, v1), timed_deploy(serving, v2), timed_deploy(serving, v1)
        endpoint_port = int(serving.current("bench").scoring_uri.split(":")[2].split("/")[0])
        hand = by_hand(first, port)
        pairs = []
        try:
            for _ in range(args.repeats):
                direct = load(port, args.seconds, args.clients, None)
                through = load(endpoint_port, args.seconds, args.clients, KEY)
                pairs.append((direct, through))
                print(f"by hand {_shown(direct)}; endpoint {_shown(through)}", flush=True)
        finally:
            os.killpg(hand.pid, 15)
            hand.wait(timeout=30)
    finally:
        serving.undeploy("bench")
    medians = [[statistics.median(pair[side][i] for pair in pairs) for i in range(3)] for side in (0, 1)]
    result = {
        "requests_per_second": {"by_hand": medians[0][0], "endpoint": medians[1][0]},
        "ratio_requests_per_second": round(medians[1][0] / medians[0][0], 3),
        "p50_ms": {"by_hand": medians[0][1], "endpoint": medians[1][1]},
        "p99_ms": {"by_hand": medians[0][2], "endpoint": medians[1][2]},
        "deploy_to_first_answer_s": {"new_endpoint": round(cold, 2), "new_version": round(warm, 2)},
        "rollback_s": round(rollback, 2),
        "with_an_environment_s": environment_deploys(first),
    }
    print(json.dumps(result))


def environment_deploys(model_dir: Path) -> dict[str, float]:
    """Deploy to first answer of a version needing a package the worker lacks: the environment built
    (cold), then cached (warm: a new endpoint, the same requirements)."""
    import tempfile

    from airflow_provider_dnntrain.backends.local.serving import LocalServing
    from airflow_provider_dnntrain.backends.serving import ServedVersion

    needs = ServedVersion("bench", "1", model_dir, requirements=(ENVIRONMENT_REQUIREMENT,))
    with tempfile.TemporaryDirectory(prefix="dnntrain-bench-environments-") as environments:
        times = {}
        for label in ("cold", "warm"):
            serving = LocalServing(environments_root=environments)
            try:
                times[label] = round(timed_deploy(serving, needs), 2)
            finally:
                serving.undeploy("bench")
    return times


if __name__ == "__main__":
    main()
