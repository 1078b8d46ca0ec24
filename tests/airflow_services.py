"""Real Airflow components on SQLite, started and stopped by PID: api-server, scheduler (LocalExecutor),
dag-processor and triggerer, and a small client for the REST API they serve."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent
COMPONENTS = {
    "api-server": ["api-server", "--host", "127.0.0.1", "--port", "{port}"],
    "scheduler": ["scheduler"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class AirflowServices:
    home: Path
    dags_folder: Path
    port: int = field(default_factory=free_port)
    log_ports: tuple[int, int] = field(default_factory=lambda: (free_port(), free_port()))
    extra_env: dict[str, str] = field(default_factory=dict)  # for every component (connections...)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    _token: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__PARALLELISM": "4",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home / 'airflow.db'}",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                "AIRFLOW__API__BASE_URL": self.url,
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
                # Their log servers on ports of their own: another test session may run services too.
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.log_ports[0]),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self.log_ports[1]),
                "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "TF_CPP_MIN_LOG_LEVEL": "2",
                **self.extra_env,
            }
        )
        return env

    def airflow(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(VENV_BIN / "airflow"), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        migrated = self.airflow("db", "migrate", timeout=300)
        assert migrated.returncode == 0, migrated.stderr[-3000:]
        for name in COMPONENTS:
            self._spawn(name)
        self._wait_until_serving()

    def _spawn(self, name: str) -> None:
        log = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
        self.processes[name] = subprocess.Popen(
            [str(VENV_BIN / "airflow"), *(a.format(port=self.port) for a in COMPONENTS[name])],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # each its own group: stopped with everything it forked
        )

    def restart(self, name: str, timeout: float = 60) -> None:
        """Stop one component as its service manager would (SIGTERM, then wait) and start it again."""
        process = self.processes[name]
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
        self._spawn(name)

    def _wait_until_serving(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                assert process.poll() is None, f"{name} exited:\n{self.log(name)[-3000:]}"
            try:
                urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=2)
                return
            except OSError:
                time.sleep(1)
        raise AssertionError(f"api-server never answered:\n{self.log('api-server')[-3000:]}")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def log(self, name: str) -> str:
        return (self.home / f"{name}.log").read_text(errors="replace")

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        """A try's log as the components wrote it: the worker's file and the triggerer's beside it."""
        folder = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        files = sorted(folder.glob(f"attempt={try_number}.log*"))
        return "".join(path.read_text(errors="replace") for path in files)

    # -- REST --------------------------------------------------------------------------------------

    def token(self) -> str:
        if self._token is None:
            password = json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())
            reply = self._call(
                "POST", "/auth/token", {"username": "admin", "password": password["admin"]}, None
            )
            self._token = reply["access_token"]
        return self._token

    def api(self, method: str, path: str, body: dict | None = None) -> Any:
        return self._call(method, f"/api/v2{path}", body, self.token())

    def _call(self, method: str, path: str, body: dict | None, token: str | None) -> Any:
        request = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Content-Type": "application/json",
                **({"Authorization": f"Bearer {token}"} if token else {}),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                text = reply.read()
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{method} {path}: {error.code} {error.read()[:2000]!r}") from None
        return json.loads(text) if text else None

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.api("PATCH", f"/dags/{dag_id}", {"is_paused": False})
                return
            except AssertionError:
                time.sleep(1)
        raise AssertionError(f"{dag_id} never parsed:\n{self.log('dag-processor')[-3000:]}")

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        self.wait_for_dag(dag_id)
        run = self.api("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})
        return run["dag_run_id"]

    def task(self, dag_id: str, run_id: str, task_id: str) -> dict:
        return self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")

    def wait_for_task(self, dag_id: str, run_id: str, task_id: str, states: set[str], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = self.task(dag_id, run_id, task_id)
            if task["state"] in states:
                return task
            time.sleep(0.5)
        raise AssertionError(
            f"{task_id} still {task['state']} after {timeout}s:\n{self.log('scheduler')[-3000:]}"
        )

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]
            if state in ("success", "failed"):
                return state
            time.sleep(0.25)
        raise AssertionError(f"{dag_id} {run_id} still running after {timeout}s")

    def tracking_run(self, job: str):
        """The embedded store's tracking run of the training run ``job``."""
        from airflow_provider_dnntrain import tracking

        client = tracking.client(f"sqlite:///{self.home / 'dnntrain' / 'mlflow.db'}")
        experiments = [e.experiment_id for e in client.search_experiments()]
        (run,) = client.search_runs(experiments, filter_string=f"tags.`dnntrain.run_id` = '{job}'")
        return run

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> Any:
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value"
        return self.api("GET", path + "?deserialize=true")["value"]
