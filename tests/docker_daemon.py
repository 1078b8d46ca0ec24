"""A real Docker daemon for the tests, started and stopped by PID, and the images they run.

``dockerd`` runs with a data root kept between runs (``~/.cache/dnntrain/docker``: the images built
once stay there), an exec root and socket of its own in a temporary folder, no default bridge and no
iptables rules (``--bridge=none --iptables=false``): a run's user-defined network is a bridge of its
own, and builds use the host's network. No registry is pulled from: the base image is made here with
``debootstrap --variant=minbase`` and imported, and the training images (torch and tensorflow, CPU)
are built from ``docker/Dockerfile`` on it, tagged by the content of what they are built from, so that a
change rebuilds.

Run ``python tests/docker_daemon.py images`` (``make test`` does) to make them before the tests; it also
puts the torch image's layers into the test registry's kept storage (``docker_registry.seed``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path.home() / ".cache" / "dnntrain" / "docker"
BASE_IMAGE = "dnntrain-base:bookworm"
MIRROR = "http://deb.debian.org/debian"
TORCH_IMAGE = "dnntrain-torch:cpu"
TENSORFLOW_IMAGE = "dnntrain-tensorflow:cpu"
IMAGES = {"torch": TORCH_IMAGE, "tensorflow": TENSORFLOW_IMAGE}  # the launchers' default images
# What the training image is built from: a change to any of them builds it again.
IMAGE_INPUTS = ("docker/Dockerfile", "constraints.txt", "scripts/install-debian-packages.sh",
                "scripts/build-horovod.sh", "scripts/cuda_architectures.py")  # fmt: skip


def dockerd() -> str:
    found = shutil.which("dockerd") or shutil.which("dockerd", path="/usr/sbin:/usr/bin")
    if not found:
        raise RuntimeError("dockerd is not installed (Debian's docker.io: make env installs it)")
    return found


@dataclass
class DockerDaemon:
    """``dockerd`` by PID; ``base_url`` is its socket."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dnntrain-docker-")))
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"unix://{self.root / 'docker.sock'}"

    def start(self, timeout: float = 60) -> DockerDaemon:
        DATA_ROOT.mkdir(parents=True, exist_ok=True)
        argv = [
            dockerd(), "--data-root", str(DATA_ROOT), "--exec-root", str(self.root / "exec"),
            "-H", self.base_url, "--pidfile", str(self.root / "docker.pid"),
            "--bridge=none", "--iptables=false", "--ip6tables=false",
        ]  # fmt: skip
        with open(self.root / "dockerd.log", "ab") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while self.docker("version", check=False).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dockerd did not start: {self.log_tail()}")
            time.sleep(0.2)
        self.remove_stale()
        return self

    def held(self, run_id: str | None = None, label: str = "dnntrain.io/run") -> tuple[list[str], list[str]]:
        """The containers and networks of run ``run_id`` (None: of every run; ``label``: of everything
        carrying it) the daemon holds."""
        found = f"label={label}={run_id}" if run_id else f"label={label}"
        containers = self.docker("ps", "-a", "-q", "--filter", found).stdout.split()
        return containers, self.docker("network", "ls", "-q", "--filter", found).stdout.split()

    def remove_stale(self) -> None:
        """What an earlier daemon on this data root was left with (a test session killed mid-way): runs,
        endpoints and their volumes."""
        containers, networks = self.held(label="dnntrain.io/managed-by")
        if containers:
            self.docker("rm", "-f", *containers, check=False)
        if networks:
            self.docker("network", "rm", *networks, check=False)
        volumes = self.docker("volume", "ls", "-q", "--filter", "label=dnntrain.io/endpoint").stdout.split()
        if volumes:
            self.docker("volume", "rm", "-f", *volumes, check=False)

    def docker(
        self, *args: str, check: bool = True, capture: bool = True, **kwargs
    ) -> subprocess.CompletedProcess:
        argv = ["docker", "-H", self.base_url, *args]
        return subprocess.run(argv, capture_output=capture, text=True, check=check, **kwargs)

    def client(self):
        import docker

        return docker.DockerClient(base_url=self.base_url)

    def log_tail(self, lines: int = 30) -> str:
        path = self.root / "dockerd.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for mounted in _mounts_under(self.root):  # the daemon's network namespace file stays mounted
            subprocess.run(["umount", "-l", mounted], check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> DockerDaemon:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- images -----------------------------------------------------------------------------------

    def has_image(self, tag: str) -> bool:
        return self.docker("image", "inspect", tag, check=False).returncode == 0

    def make_base(self) -> None:
        """Debian bookworm, minimal, made here and imported (no registry is pulled from)."""
        if self.has_image(BASE_IMAGE):
            return
        with tempfile.TemporaryDirectory(prefix="dnntrain-rootfs-") as rootfs:
            subprocess.run(["debootstrap", "--variant=minbase", "bookworm", rootfs, MIRROR], check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
            tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
            self.docker("import", "-", BASE_IMAGE, stdin=tar.stdout)
            tar.wait()

    def build_image(self, framework: str) -> str:
        """``docker/Dockerfile`` (``framework``, CPU) on the base, with this machine's torch wheel and CA
        certificates; tagged ``dnntrain-<framework>:cpu`` and by its inputs' content."""
        digest = hashlib.sha256(b"".join((REPO / p).read_bytes() for p in IMAGE_INPUTS)).hexdigest()[:12]
        image = IMAGES[framework]
        tagged = f"{image}-{digest}"
        if not self.has_image(tagged):
            for wheel in Path("/opt/wheels").glob("torch-*.whl"):
                shutil.copy2(wheel, REPO / "docker" / "wheels" / wheel.name)
            for cert in Path("/usr/local/share/ca-certificates").glob("*.crt"):
                shutil.copy2(cert, REPO / "docker" / "certs" / cert.name)
            self.docker(
                "build", "--network", "host", "-f", "docker/Dockerfile",
                "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg", f"FRAMEWORK={framework}",
                "--build-arg", "TORCH_INDEX=", "-t", tagged, ".", cwd=REPO, capture=False,
            )  # fmt: skip
        self.docker("tag", tagged, image)
        return tagged

    def remove_stale_images(self, kept: list[str]) -> None:
        """Training images of earlier contents (not in ``kept``), environment images built on a base
        that is no longer there, and the layers only they held: a machine that runs the tests again
        and again keeps one set."""

        def images(*filters: str, shown: str = "{{.ID}}") -> list[str]:
            return self.docker("images", "--format", shown, *filters).stdout.split()

        def inspected(image: str, field: str) -> str:
            return self.docker("image", "inspect", "--format", field, image).stdout.strip()

        training = images("--filter", "reference=dnntrain-*:cpu-*", shown="{{.Repository}}:{{.Tag}}")
        stale = [name for name in training if name not in kept]
        bases = {inspected(image, "{{.Id}}") for image in kept}
        base_of = '{{index .Config.Labels "dnntrain.io/base-image-id"}}'
        environments = images("--filter", "label=dnntrain.io/base-image-id")
        stale += [image for image in environments if inspected(image, base_of) not in bases]
        if stale:
            self.docker("rmi", "-f", *sorted(set(stale)), check=False)
        self.docker("image", "prune", "-f", check=False)


def _mounts_under(root: Path) -> list[str]:
    with open("/proc/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    return sorted((p for p in points if p.startswith(f"{root}/")), reverse=True)


def main() -> None:
    if sys.argv[1:] != ["images"]:
        sys.exit("usage: docker_daemon.py images")
    started = time.monotonic()
    from docker_registry import seed

    with DockerDaemon() as daemon:
        daemon.make_base()
        tagged = [daemon.build_image(framework) for framework in IMAGES]
        daemon.remove_stale_images(tagged)
        seed(daemon.client(), TORCH_IMAGE)
    print(f"docker test images ready ({', '.join(tagged)}) in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
