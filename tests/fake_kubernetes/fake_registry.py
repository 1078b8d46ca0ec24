"""The fake kubelet's pulls from a registry that really runs (the tests' registry on 127.0.0.1, see
tests/docker_registry.py): the image's manifest must be there, read with the credentials of the pod's
``imagePullSecrets`` as kubelet reads them. Other images are "pulled" from the list the fake cluster
was started with."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

LOCAL_REGISTRY_HOSTS = ("127.0.0.1", "localhost")
MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    ]
)


def in_local_registry(image: str) -> bool:
    first, _, rest = image.partition("/")
    return bool(rest) and ":" in first and first.split(":")[0] in LOCAL_REGISTRY_HOSTS


def pull_credentials(secrets: list[dict]) -> dict[str, str]:
    """``{registry host: "Basic ..."}`` from ``kubernetes.io/dockerconfigjson`` Secrets."""
    found = {}
    for secret in secrets:
        encoded = (secret.get("data") or {}).get(".dockerconfigjson")
        if not encoded:
            continue
        for host, entry in json.loads(base64.b64decode(encoded)).get("auths", {}).items():
            auth = (
                entry.get("auth")
                or base64.b64encode(
                    f"{entry.get('username', '')}:{entry.get('password', '')}".encode()
                ).decode()
            )
            found[host.split("://")[-1].rstrip("/")] = f"Basic {auth}"
    return found


def pull_refusal(image: str, credentials: dict[str, str]) -> str | None:
    """Why the registry will not give ``image``'s manifest (kubelet's wording), or None."""
    host, _, rest = image.partition("/")
    repository, reference = _split(rest)
    headers = {"Accept": MANIFEST_TYPES}
    if host in credentials:
        headers["Authorization"] = credentials[host]
    url = f"http://{host}/v2/{repository}/manifests/{reference}"
    request = urllib.request.Request(url, method="HEAD", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10):
            return None
    except urllib.error.HTTPError as error:
        status = f"{error.code} {error.reason}"
    except OSError as error:
        status = f"dial tcp {host}: {error}"
    return (
        f'failed to pull and unpack image "{image}": failed to resolve reference "{image}": '
        f"pulling from host {host} failed with status code [manifests {reference}]: {status}"
    )


def _split(name: str) -> tuple[str, str]:
    if "@" in name:
        return tuple(name.split("@", 1))  # type: ignore[return-value]
    repository, _, tag = name.rpartition(":")
    return (repository, tag) if repository else (name, "latest")
