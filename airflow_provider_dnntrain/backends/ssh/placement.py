"""Where an SSH job's replicas go: the hosts in the order the topology asks for them, on ports each host
found free, each replica started by its host's own interpreter."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence

from airflow_provider_dnntrain.spec import TrainingJob
from airflow_provider_dnntrain.topology import Endpoint, JobPlan, render_plan


class HostPlacement:
    """Replicas spread over the hosts in the order the topology asks for them (the first replica on the
    first host, the next on the next...), each on a port free on its host (``ports``) or, before a
    run, the topology's default port."""

    def __init__(self, hosts: Sequence[str], ports: Mapping[str, list[int]] | None, runs_as_root: bool):
        self.hosts = list(hosts)
        self.runs_as_root = runs_as_root
        self._free = {host: list(ports.get(host, [])) for host in hosts} if ports else None
        self._assigned: dict[tuple[str, int], Endpoint] = {}

    def endpoint(self, role: str, index: int, default_port: int) -> Endpoint:
        key = (role, index)
        if key not in self._assigned:
            host = self.hosts[len(self._assigned) % len(self.hosts)]
            on_host = sum(1 for e in self._assigned.values() if e.host == host)
            port = self._free[host].pop(0) if self._free is not None else default_port + on_host
            self._assigned[key] = Endpoint(host, port)
        return self._assigned[key]

    def ports_needed(self) -> dict[str, int]:
        counts = collections.Counter(e.host for e in self._assigned.values())
        return {host: counts.get(host, 0) for host in self.hosts}


def render_on_hosts(
    job: TrainingJob, run_id: str, placement: HostPlacement, python: str, interpreters: Mapping[str, str]
) -> JobPlan:
    """The topology, each replica's interpreter being its host's own (a connection's ``python``, or the
    job's environment built there: ``interpreters`` by peer address; ``python`` elsewhere)."""
    plan = render_plan(job, run_id, placement, python)
    own = {host: path for host, path in interpreters.items() if path != python}
    if not own:
        return plan
    if len({own.get(host, python) for host in plan.hosts}) > 1:
        raise ValueError(
            f"python: {job.distribution.kind}'s runner starts every rank with one command line, but "
            f"its hosts name different interpreters ({', '.join(sorted({*own.values(), python}))}); "
            "give them the same path"
        )
    on_host = [
        dataclasses.replace(r, argv=[own[r.host] if a == python else a for a in r.argv])
        if r.host in own
        else r
        for r in plan.replicas
    ]
    return dataclasses.replace(plan, replicas=on_host)
