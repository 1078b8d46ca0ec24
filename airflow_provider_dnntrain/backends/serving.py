"""The interface every backend serves models behind, and the one rollout they share.

An endpoint is a name, a stable address and a key. A backend starts a version *beside* the one
serving (its own slot, reachable alone), switches the endpoint's traffic to a slot, stops a slot, and
removes the endpoint. :func:`roll_out` is blue/green on top of that: the new version must answer its
probe and the smoke test on its own before traffic moves to it; a failure stops it and leaves the old
one serving.
"""

from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_ENDPOINT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # a DNS label: a Service's name too


def checked_endpoint(name: str) -> str:
    if not _ENDPOINT_NAME.match(name or ""):
        raise ValueError(f"endpoint: {name!r} is not a name of lowercase letters, digits and '-' (≤ 63)")
    return name


class ServingFailed(RuntimeError):
    """A version could not be served or failed its check; the endpoint is as it was."""


@dataclass(frozen=True)
class ServedVersion:
    """A registered version, as a backend serves it: its files here (an MLflow pyfunc model), what it
    needs, and the registry it is in (for a backend whose servers fetch it themselves)."""

    name: str
    version: str
    model_dir: Path
    requirements: tuple[str, ...] = ()
    framework: str = ""  # "pytorch", "tensorflow" (the version's tag)
    resources: dict = field(default_factory=dict)  # its resource configuration: cpu, memory_in_gb, gpu
    registry_uri: str = ""
    registry_credentials: dict = field(default_factory=dict, repr=False)
    artifact_uri: str = ""  # where the registry keeps its files (for a server that fetches them there)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass
class EndpointState:
    """What an endpoint serves, and where (what the deploy task returns, key aside)."""

    endpoint: str
    scoring_uri: str
    health_uri: str
    serving: str | None  # "<model>/<version>", None before the first switch
    state: str  # "serving", "absent"
    slots: dict[str, str] = field(default_factory=dict)  # slot -> "<model>/<version>"
    traffic: dict[str, int] = field(default_factory=dict)  # slot -> its share of requests, in percent

    def __post_init__(self) -> None:
        if not self.traffic and self.serving:
            active = [slot for slot, label in self.slots.items() if label == self.serving]
            self.traffic = {active[0]: 100} if active else {}


class Serving(ABC):
    """One backend's model serving (``serving=`` of DeployModelOperator, as ``launcher=`` trains)."""

    @abstractmethod
    def locked(self, endpoint: str) -> contextlib.AbstractContextManager:
        """Held while a task changes the endpoint: two deploys of one endpoint run one after the other."""

    @abstractmethod
    def current(self, endpoint: str) -> EndpointState:
        """What the endpoint serves now (``state="absent"`` when it does not exist)."""

    @abstractmethod
    def start(self, endpoint: str, version: ServedVersion, key_hash: str) -> str:
        """Start ``version`` in a new slot beside what serves, and return the slot once its probe
        answers; ``ServingFailed`` (with the server's last words) if it does not."""

    @abstractmethod
    def reaching(self, endpoint: str, slot: str) -> contextlib.AbstractContextManager[str]:
        """The base URL where the slot alone answers (its own scoring server), for the checks, while
        the context lasts (a backend may open a tunnel to it)."""

    @abstractmethod
    def switch(self, endpoint: str, slot: str) -> EndpointState:
        """Send the endpoint's traffic to ``slot``."""

    splits_traffic = False  # whether split() can send part of the traffic to a slot (a canary)
    requires_key = True  # whether the endpoint checks its own key (else the cluster's gateway does)

    def split(self, endpoint: str, slot: str, percent: int) -> EndpointState:
        """Send about ``percent`` of the traffic to ``slot``, the rest to what serves (a canary)."""
        raise NotImplementedError

    @abstractmethod
    def stop(self, endpoint: str, slot: str) -> None:
        """Stop a slot's version (not the endpoint)."""

    @abstractmethod
    def undeploy(self, endpoint: str) -> bool:
        """Remove everything the endpoint owns; False if there was nothing."""


def roll_out(
    serving: Serving,
    endpoint: str,
    version: ServedVersion,
    key_hash: str,
    check: Callable[[str], None],
    log: Callable[[str], None] = print,
    canary_percent: int | None = None,
) -> EndpointState:
    """Blue/green: ``version`` started beside what serves, ``check(slot base URL)`` passed (it raises
    ``ServingFailed`` otherwise), then switched to, then the old slots stopped. Serving it already: a
    no-op. ``canary_percent`` below 100: about that share of the traffic only, the old version kept
    serving the rest (a later roll-out of the same version moves it, 100 finishes; with nothing serving
    yet, it takes all of it). Call with ``serving.locked(endpoint)`` held."""
    share = 100 if canary_percent is None else canary_percent
    if share < 100 and not serving.splits_traffic:
        raise ServingFailed(f"canary_traffic_percent: {type(serving).__name__} switches all traffic at once")
    now = serving.current(endpoint)
    if now.serving == version.label and len(now.traffic) == 1:
        log(f"Endpoint {endpoint} already serves {version.label}: nothing to do")
        return now
    slot = next((s for s, label in now.slots.items() if label == version.label and s in now.traffic), None)
    if slot is None and len(now.traffic) > 1:
        raise ServingFailed(
            f"endpoint {endpoint} has a canary in progress ({now.slots}, traffic {now.traffic}): finish it "
            "(deploy its version with canary_traffic_percent=100) or roll it back (deploy the other) first"
        )
    if slot is None:
        slot = _started_and_checked(serving, endpoint, version, key_hash, check)
        log(f"Endpoint {endpoint}: {version.label} passed its checks in slot {slot}")
    if share < 100 and now.traffic:
        log(f"Endpoint {endpoint}: sending about {share}% of the traffic to {version.label}")
        return serving.split(endpoint, slot, share)
    log(f"Endpoint {endpoint}: switching all traffic to {version.label}")
    serving.switch(endpoint, slot)
    for old in [s for s in now.slots if s != slot]:
        serving.stop(endpoint, old)
    return serving.current(endpoint)


def _started_and_checked(
    serving: Serving, endpoint: str, version: ServedVersion, key_hash: str, check: Callable[[str], None]
) -> str:
    slot = serving.start(endpoint, version, key_hash)
    try:
        with serving.reaching(endpoint, slot) as base_url:
            check(base_url)
    except BaseException:
        serving.stop(endpoint, slot)
        raise
    return slot
