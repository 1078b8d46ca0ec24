"""Memory as a real API server and node limit it:

- LimitRange admission (:func:`admit`): a namespace's LimitRanges of type Container give containers
  without limits or requests their defaults and refuse a pod whose containers go past ``max`` or
  below ``min`` - with the LimitRanger plugin's 403;
- memory limits enforced (:class:`MemoryCgroups`): a container with a memory limit runs, with whatever
  is exec'd into it, in a memory cgroup of that size; past it the kernel kills its largest process
  and the container is OOMKilled (exit 137), as kubelet reports it.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")  # cgroup v1's memory controller
_UNITS = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "m": 10**-3,
}  # fmt: skip


def quantity(text: str | int | float) -> float:
    """A Kubernetes quantity ("256Mi", "1.5", "100m") as a number."""
    text = str(text)
    for suffix in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * _UNITS[suffix]
    return float(text)


def admit(pod: dict, limit_ranges: list[dict]) -> tuple[int, str] | None:
    """Defaults from ``limit_ranges`` into ``pod``'s containers; (status, message) when it is refused."""
    containers = [*(pod["spec"].get("initContainers") or []), *pod["spec"]["containers"]]
    for limit_range in limit_ranges:
        for item in limit_range.get("spec", {}).get("limits") or []:
            if item.get("type") != "Container":
                continue
            for container in containers:
                if refusal := _admit_container(container, item):
                    return 403, refusal
    for index, container in enumerate(pod["spec"]["containers"]):
        resources = container.get("resources") or {}
        for name, request in (resources.get("requests") or {}).items():
            limit = (resources.get("limits") or {}).get(name)
            if limit is not None and quantity(request) > quantity(limit):
                field = f"spec.containers[{index}].resources.requests"
                bound = f"must be less than or equal to {name} limit of {limit}"
                return 422, f'{field}: Invalid value: "{request}": {bound}'
    return None


def _admit_container(container: dict, item: dict) -> str | None:
    resources = container.setdefault("resources", {})
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    for name, limit in limits.items():  # the API's own defaulting: a limit alone is also the request
        requests.setdefault(name, limit)
    default_limit = item.get("default") or item.get("max") or {}
    for name, value in default_limit.items():
        limits.setdefault(name, value)
    for name, value in (item.get("defaultRequest") or default_limit).items():
        requests.setdefault(name, value)
    resources.update({key: value for key, value in (("limits", limits), ("requests", requests)) if value})
    for name, most in (item.get("max") or {}).items():
        if quantity(limits[name]) > quantity(most):
            return f"maximum {name} usage per Container is {most}, but limit is {limits[name]}"
    for name, least in (item.get("min") or {}).items():
        if name not in requests:
            return f"minimum {name} usage per Container is {least}.  No request is specified"
        if quantity(requests[name]) < quantity(least):
            return f"minimum {name} usage per Container is {least}, but request is {requests[name]}"
    return None


class MemoryCgroups:
    """One memory cgroup per limited container, under a folder of this fake's own."""

    def __init__(self, name: str) -> None:
        self.base = CGROUP_MEMORY / name

    @staticmethod
    def available() -> bool:
        return os.access(CGROUP_MEMORY, os.W_OK)

    def make(self, pod: str, container: str, limit: str) -> Path:
        path = self.base / f"{pod}-{container}"
        path.mkdir(parents=True, exist_ok=True)
        (path / "memory.limit_in_bytes").write_text(str(int(quantity(limit))))
        return path

    @staticmethod
    def oom_killed(path: Path) -> bool:
        with contextlib.suppress(OSError):
            for line in (path / "memory.oom_control").read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1]) > 0
        return False

    @staticmethod
    def peak(path: Path) -> int:
        return int((path / "memory.max_usage_in_bytes").read_text())

    @staticmethod
    def remove(path: Path) -> None:
        """Once its last process is gone (which the kernel notes a moment after it ends)."""
        for _ in range(50):
            try:
                path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)

    def remove_all(self) -> None:
        if self.base.is_dir():
            for path in self.base.iterdir():
                if path.is_dir():
                    self.remove(path)
            self.remove(self.base)
