"""A fake Kubernetes cluster for the tests: ``apiserver.py`` (an API server and a kubelet in one process)
started as a subprocess, reached over HTTP through a kubeconfig, as any client reaches a cluster.

Pods run as real processes in network namespaces named ``<prefix>-p<N>``, on a bridge in
``<prefix>-br``; nothing else on the machine is touched, and everything is stopped by PID and
namespace name at the end.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SERVER = Path(__file__).with_name("apiserver.py")
TOKEN = "fake-cluster-token"
GATEWAY = "10.215.0.1"  # this machine, as the pods see it
NAMESPACE = "training"
IMAGES = ("dnntrain-torch", "dnntrain-tensorflow")
# Mount points the fake containers bind volumes at (the fake shares this machine's file system): ours,
# an MPIJob launcher's and a KServe predictor's. (The service account's, under /run, are in each
# container's own /run.)
MOUNT_ROOTS = ("/dnntrain", "/etc/mpi", "/opt/kube", "/mnt/models")
_sets = itertools.count()
# What a run (or the training operator, for it) may create, by API group.
_RUN_KINDS = {
    "": ("pods", "services", "secrets", "configmaps", "serviceaccounts"),
    "kubeflow.org/v1": ("tfjobs", "pytorchjobs", "mpijobs"),
    "rbac.authorization.k8s.io/v1": ("roles", "rolebindings"),
}


@dataclass
class FakeCluster:
    root: Path
    images: tuple[str, ...] = IMAGES
    port: int = 0
    gateway_port: int = 0
    # Kubeflow's training operator: "run" serves TFJobs / PyTorchJobs / MPIJobs and runs them; "crd"
    # only serves them (its CRDs installed, the operator down); None serves none.
    training_operator: str | None = None
    process: subprocess.Popen | None = None
    _created_roots: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.prefix = f"fk{os.getpid() % 100000}-{next(_sets)}"
        self.kubeconfig = self.root / "kubeconfig.yaml"

    def start(self) -> FakeCluster:
        from airflow_provider_dnntrain.backends.common.ports import free_port

        self.root.mkdir(parents=True, exist_ok=True)
        self._created_roots = [Path(p) for p in MOUNT_ROOTS if not Path(p).exists()]
        self.gateway_port = free_port("127.0.0.1", taken=set())
        port_file = self.root / "port"
        with open(self.root / "apiserver.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(SERVER), "--root", str(self.root), "--port-file", str(port_file),
                 "--prefix", self.prefix, "--images", ",".join(self.images),
                 "--gateway-port", str(self.gateway_port),
                 *(["--training-operator", self.training_operator] if self.training_operator else [])],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the fake API server did not start: {self.log_tail()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self.kubeconfig.write_text(yaml.safe_dump(self._kubeconfig()))
        return self

    def _kubeconfig(self) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "fake", "user": {"token": TOKEN}}],
            "contexts": [
                {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": NAMESPACE}}
            ],
            "current-context": "fake",
        }

    def airflow_connection(self) -> str:
        """The cncf-kubernetes connection a user would define for this cluster (JSON), with the extra
        the Kubernetes launcher reads: where pods reach a tracking store served on this machine."""
        extra = {
            "kube_config_path": str(self.kubeconfig),
            "namespace": NAMESPACE,
            "tracking_address": self.tracking_address,  # where pods reach this machine's store
        }
        return json.dumps({"conn_type": "kubernetes", "extra": extra})

    @property
    def tracking_address(self) -> str:
        """Where pods reach a tracking store served on this machine's 127.0.0.1:<gateway_port>."""
        return f"{GATEWAY}:{self.gateway_port}"

    @contextlib.contextmanager
    def shared_address(self):
        """``(address, port)`` where this machine and the pods alike reach a server listening here on
        ``0.0.0.0:<port>``, as both would reach a store on the cluster's network: the gateway's address,
        added to this machine's loopback while the context lasts (pods arrive through the gateway)."""
        add = ["ip", "addr", "add", f"{GATEWAY}/32", "dev", "lo"]
        added = subprocess.run(add, capture_output=True, timeout=30).returncode == 0
        try:
            yield GATEWAY, self.gateway_port
        finally:
            if added:
                subprocess.run(["ip", "addr", "del", f"{GATEWAY}/32", "dev", "lo"], capture_output=True)

    # -- looking at it -----------------------------------------------------------------------------

    def api(self, path: str, method: str = "GET") -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        request.add_header("Authorization", f"Bearer {TOKEN}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def objects(self, plural: str, namespace: str = NAMESPACE, group: str = "") -> list[dict]:
        """Objects of a kind (``group``: ``<group>/<version>`` of a custom resource's)."""
        prefix = f"/apis/{group}" if group else "/api/v1"
        return self.api(f"{prefix}/namespaces/{namespace}/{plural}")["items"]

    @contextlib.contextmanager
    def service_reached(self, name: str, namespace: str = NAMESPACE, port: int = 80):
        """A local base URL relayed to a Service's cluster address: a client on the pods' network."""
        from ssh_hosts import NamespaceForwarder

        address = self.api(f"/api/v1/namespaces/{namespace}/services/{name}")["spec"]["clusterIP"]
        forwarder = NamespaceForwarder(f"{self.prefix}-br", address, port)
        try:
            yield f"http://127.0.0.1:{forwarder.port}"
        finally:
            forwarder.close()

    def patch(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(), method="PATCH"
        )
        request.add_header("Authorization", f"Bearer {TOKEN}")
        request.add_header("Content-Type", "application/merge-patch+json")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def left_behind(self, timeout: float = 30) -> dict[str, list]:
        """What is still in the cluster (objects of a run, pod processes) once ``timeout`` has passed
        without it emptying; ``{}`` as soon as it is empty."""
        deadline = time.monotonic() + timeout
        while True:
            kinds = {k: self.objects(k, group=g) for g, plurals in _RUN_KINDS.items() for k in plurals}
            left = {k: [o["metadata"]["name"] for o in found] for k, found in kinds.items() if found}
            if processes := self.pod_processes():
                left["processes"] = processes
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)

    def requests(self) -> dict[str, int]:
        return self.api("/fake/requests")

    def faults(self, **settings) -> None:
        """Misbehave from now on (``faults.Faults``' fields; none: behave again)."""
        self._post("/fake/faults", settings)

    def role(self, rules: list[dict] | None) -> None:
        """Bind the token to a Role with these rules (``None``: allow everything again)."""
        self._post("/fake/rbac", {"rules": rules})

    def injected(self) -> dict:
        """The faults injected so far, and the requests RBAC denied."""
        return self.api("/fake/faults")

    @contextlib.contextmanager
    def misbehaving(self, rules: list[dict] | None = None, **faults):
        """Faults and a Role for a test's while; the cluster behaves again after it."""
        self.faults(**faults)
        self.role(rules)
        try:
            yield self
        finally:
            self.faults()
            self.role(None)

    @contextlib.contextmanager
    def limit_range(self, container_limits: dict, namespace: str = NAMESPACE):
        """A LimitRange of type Container (``default``, ``max``, ...) in ``namespace`` for a while."""
        name = f"limits-{uuid.uuid4().hex[:6]}"
        body = {"apiVersion": "v1", "kind": "LimitRange", "metadata": {"name": name}}
        body["spec"] = {"limits": [{"type": "Container", **container_limits}]}
        self._post(f"/api/v1/namespaces/{namespace}/limitranges", body)
        try:
            yield
        finally:
            self.api(f"/api/v1/namespaces/{namespace}/limitranges/{name}", method="DELETE")

    def memory_peaks(self) -> dict[str, int]:
        """ "namespace/pod/container" -> the most memory (bytes) each memory-limited container of a
        removed pod used, exec'd processes included."""
        return self.api("/fake/memory")

    def _post(self, path: str, body: dict) -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(), method="POST"
        )
        request.add_header("Authorization", f"Bearer {TOKEN}")
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def evict(self, pod: str, namespace: str = NAMESPACE) -> None:
        self.api(f"/fake/evict/{namespace}/{pod}", method="POST")

    def pod_processes(self) -> list[int]:
        """Every process still running in any pod of this cluster."""
        return [pid for namespace in self._pod_namespaces() for pid in _namespace_pids(namespace)]

    def pod_commands(self) -> dict[int, str]:
        """pid -> command line of every process in the cluster's pods."""
        found = {}
        for pid in self.pod_processes():
            with contextlib.suppress(OSError):
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        return found

    def workdirs(self, pod_prefix: str) -> list[Path]:
        """The working directories (``/dnntrain/run`` inside) of the pods whose names start so."""
        return list((self.root / "pods").glob(f"{NAMESPACE}-{pod_prefix}*/volumes/workdir"))

    def _pod_namespaces(self) -> list[str]:
        run = Path("/run/netns")
        return [p.name for p in run.glob(f"{self.prefix}-p*")] if run.exists() else []

    def log_tail(self, lines: int = 30) -> str:
        path = self.root / "apiserver.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    # -- stop --------------------------------------------------------------------------------------

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
            if self.process.poll() is None:
                self.process.kill()
        for namespace in [*self._pod_namespaces(), f"{self.prefix}-br"]:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in _namespace_pids(namespace):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
            shutil.rmtree(Path("/etc/netns") / namespace, ignore_errors=True)
        for created in self._created_roots:
            shutil.rmtree(created, ignore_errors=True)  # only empty mount points were made there

    def __enter__(self) -> FakeCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _namespace_pids(namespace: str) -> list[int]:
    listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=30)
    return [int(pid) for pid in listed.stdout.split()]


def fake_launcher(cluster: FakeCluster, monkeypatch, work_root, **options):
    """A KubernetesLauncher on ``cluster`` through the connection a user would define, with the tests'
    short intervals (``options`` on top)."""
    from airflow_provider_dnntrain.backends.kubernetes.launcher import KubernetesLauncher

    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_FAKE", cluster.airflow_connection())
    settings = {"poll_interval": 0.5, "stop_grace_seconds": 5, "startup_timeout_seconds": 20, **options}
    return KubernetesLauncher(kubernetes_conn_id="kubernetes_fake", work_root=str(work_root), **settings)


def assert_nothing_left(cluster: FakeCluster) -> None:
    left = cluster.left_behind()
    assert not left, f"left behind: {left}"


def ranks_job(*arguments: str, nodes: int = 1):
    """tests/scripts/ranks.py as a job: alone, or on ``nodes`` torchrun nodes."""
    from airflow_provider_dnntrain.spec import SingleNode, TorchDistributed, TrainingJob

    distribution = TorchDistributed(node_count=nodes, process_count_per_node=1) if nodes > 1 else SingleNode()
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    return TrainingJob(
        framework="pytorch",
        source_directory=str(scripts),
        entry_script="ranks.py",
        arguments=list(arguments),
        distribution=distribution,
    )
