"""configMap volumes that follow their ConfigMap while the pod runs, as kubelet keeps them (it takes
up to about a minute on a real node; here a second): how a run's lease reaches its pods."""

from __future__ import annotations

import asyncio
import os

SYNC_SECONDS = 1.0


async def keep_config_maps_current(cluster, runtime, pod: dict) -> None:
    namespace = runtime.key[1]
    volumes = [
        v for v in pod["spec"].get("volumes") or [] if "configMap" in v and not v["configMap"].get("items")
    ]
    while runtime.key in cluster.runtimes:
        await asyncio.sleep(SYNC_SECONDS)
        for volume in volumes:
            source = cluster.store.objects.get(
                ("api/v1", namespace, "configmaps", volume["configMap"]["name"])
            )
            folder = runtime.directory / "volumes" / volume["name"]
            for key, value in ((source or {}).get("data") or {}).items():
                target = folder / key
                if target.is_file() and target.read_text() != value:
                    fresh = folder / f".{key}.new"
                    fresh.write_text(value)
                    os.replace(fresh, target)  # atomically, as kubelet swaps its ..data link
