"""What the cluster says about an endpoint, read (pure): each slot's share of the traffic, whether a
pod is ready, and why a container will not come up."""

from __future__ import annotations

# Waiting reasons of a container that will not come up by waiting longer.
BROKEN = {
    "CrashLoopBackOff",
    "ErrImagePull",
    "ImagePullBackOff",
    "CreateContainerConfigError",
    "InvalidImageName",
}


def traffic_shares(deployments: dict, selected: str | None) -> dict[str, int]:
    """Each slot's share of the traffic, in percent: the selected slot's all of it; both selected
    (a canary), by their replicas, as the Service spreads connections over pods."""
    if selected:
        return {selected: 100} if selected in deployments else {}
    counts = {slot: d.spec.replicas or 0 for slot, d in deployments.items()}
    total = sum(counts.values())
    return {slot: round(100 * n / total) for slot, n in counts.items()} if total else {}


def broken(status) -> str | None:
    """Why a container (its status) failed or keeps failing; None while it may still come up."""
    waiting = status.state.waiting if status.state else None
    if waiting and waiting.reason in BROKEN:
        return f"{waiting.reason}: {waiting.message or ''}".strip()
    for state in (status.state, status.last_state):
        ended = state.terminated if state else None
        if ended and ended.exit_code:
            return f"exited {ended.exit_code} ({ended.reason or 'Error'})"
    return None


def is_ready(pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
