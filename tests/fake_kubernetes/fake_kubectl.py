"""The fake cluster's ``kubectl`` and ``kubectl-delivery`` image, for the Kubeflow operator's MPIJob v1:
its launcher's ``kubexec.sh`` starts each rank's daemon with ``kubectl exec <pod> -- /bin/sh -c "..."``.

``exec POD [--container C] -- CMD...``: CMD in the pod's container (the first unless named) over the API's
``pods/exec`` websocket, its output relayed, its exit code returned: a real client of the fake API, with
the pod's service-account credentials (``KUBERNETES_SERVICE_HOST``/``PORT`` and the mounted token) as
kubectl takes them in a pod.
``deliver``: what the ``kubeflow/kubectl-delivery`` image does as the launcher's init container: put
``kubectl`` in ``$TARGET_DIR``, then wait until every worker pod of ``/etc/mpi/hostfile`` is Running and
Ready (mpi-operator's ``kubectl-delivery`` controller).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
HOSTFILE = Path("/etc/mpi/hostfile")


def core_api():
    from kubernetes import client

    config = client.Configuration()
    config.host = f"http://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}"
    config.api_key = {"authorization": f"Bearer {(ACCOUNT / 'token').read_text().strip()}"}
    return client.CoreV1Api(client.ApiClient(config))


def namespace() -> str:
    return os.environ.get("NAMESPACE") or (ACCOUNT / "namespace").read_text().strip()


def exec_in_pod(pod: str, container: str | None, command: list[str]) -> int:
    from kubernetes.stream import stream

    core = core_api()
    if container is None:  # kubectl's default: the pod's first container
        container = core.read_namespaced_pod(pod, namespace()).spec.containers[0].name
    session = stream(
        core.connect_get_namespaced_pod_exec,
        pod,
        namespace(),
        command=command,
        container=container,
        stdin=False,
        stdout=True,
        stderr=True,
        tty=False,
        _preload_content=False,
    )
    while True:
        open_ = session.is_open()
        if open_:
            session.update(timeout=1)
        for read, out in ((session.read_stdout, sys.stdout), (session.read_stderr, sys.stderr)):
            if data := read(timeout=0):
                out.write(data)
                out.flush()
        if not open_:
            return session.returncode or 0


def deliver() -> None:
    target = Path(os.environ["TARGET_DIR"])
    target.mkdir(parents=True, exist_ok=True)
    kubectl = target / "kubectl"
    kubectl.write_text(f'#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} "$@"\n')
    kubectl.chmod(0o755)
    names = [line.split()[0].split(":")[0] for line in HOSTFILE.read_text().splitlines() if line.strip()]
    workers = {name for name in names if not name.endswith("launcher")}
    core = core_api()
    while workers:
        for pod in core.list_namespaced_pod(namespace()).items:
            ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
            if pod.metadata.name in workers and pod.status.phase == "Running" and ready:
                workers.discard(pod.metadata.name)
        time.sleep(0.5)


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["deliver"]:
        deliver()
        return
    if args[:1] != ["exec"] or "--" not in args:
        sys.exit(f"fake kubectl: only 'exec POD [--container C] -- CMD...' is here, not {args}")
    options, command = args[1 : args.index("--")], args[args.index("--") + 1 :]
    container = None
    for flag in ("--container", "-c"):
        if flag in options:
            container = options.pop(options.index(flag) + 1)
            options.remove(flag)
    sys.exit(exec_in_pod(options[0], container, command))


if __name__ == "__main__":
    main()
