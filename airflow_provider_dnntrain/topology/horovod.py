"""Horovod: one launcher process (horovodrun or mpirun) on the first node starts every rank."""

from __future__ import annotations

from airflow_provider_dnntrain.spec import Horovod, TrainingJob
from airflow_provider_dnntrain.topology.gpus import gpu_vars
from airflow_provider_dnntrain.topology.plan import (
    LAUNCHER_VARS,
    TRACKING_VARS,
    JobPlan,
    Placement,
    Replica,
    base_env,
    script_argv,
)

HOSTFILE = "hostfile"
RANK_LOGS = "logs/ranks"
# Open MPI forwards rank output in arbitrary chunks (even --tag-output splits lines), so MPI-started
# ranks write whole files per rank instead; ":nocopy" keeps them off mpirun's own console.
_MPI_OUTPUT = ["--output-filename", f"{RANK_LOGS}:nocopy"]
# What every rank needs from the launcher's environment when mpirun starts it on another host.
_ALWAYS_EXPORTED = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONUNBUFFERED")


def render_host_list(hosts: list[str], slots: int) -> str:
    return ",".join(f"{host}:{slots}" for host in hosts)


def render_hostfile(hosts: list[str], slots: int) -> str:
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def render_horovodrun_argv(dist: Horovod, python: str, hosts: list[str], command: list[str]) -> list[str]:
    argv = [python, "-m", "horovod.runner.launch", "-np", str(dist.world_size)]
    argv += ["-H", render_host_list(hosts, dist.process_count_per_node), f"--{dist.controller}"]
    if dist.controller == "mpi":
        argv += _MPI_OUTPUT
    if dist.network_interface:
        argv += ["--network-interfaces", dist.network_interface]
    if dist.ssh_port:
        argv += ["-p", str(dist.ssh_port)]
    return [*argv, *command]


def render_mpirun_argv(dist: Horovod, exported: list[str], command: list[str], as_root: bool) -> list[str]:
    argv = ["mpirun"]
    if as_root:
        argv.append("--allow-run-as-root")
    argv += ["-np", str(dist.world_size), "--hostfile", HOSTFILE, "-bind-to", "none", "-map-by", "slot"]
    argv += _MPI_OUTPUT
    if dist.oversubscribe:
        argv.append("--oversubscribe")
    if dist.network_interface:
        for param in ("btl_tcp_if_include", "oob_tcp_if_include"):
            argv += ["-mca", param, dist.network_interface]
    if dist.ssh_port:
        argv += ["-mca", "plm_rsh_args", f"-p {dist.ssh_port}"]
    for name in exported:
        argv += ["-x", name]
    return [*argv, *command]


def render_horovod_plan(job: TrainingJob, run_id: str, placement: Placement, python: str) -> JobPlan:
    dist = job.distribution
    assert isinstance(dist, Horovod)
    hosts = [placement.endpoint("node", i, 0).host for i in range(dist.node_count)]
    env = base_env(job, run_id, "launcher", 0)
    command = script_argv(job, python)
    files = {}
    if dist.runner == "mpirun":
        exported = sorted(
            {
                *_ALWAYS_EXPORTED,
                *env,
                *LAUNCHER_VARS,
                *TRACKING_VARS,
                *job.environment.secrets,
                *gpu_vars(job),
            }
        )
        argv = render_mpirun_argv(dist, exported, command, getattr(placement, "runs_as_root", False))
        files[HOSTFILE] = render_hostfile(hosts, dist.process_count_per_node)
    else:
        argv = render_horovodrun_argv(dist, python, hosts, command)
    # The launcher runs on the first node, unless the backend gives it a host of its own (an MPIJob's
    # launcher pod, which starts every rank on the nodes).
    apart = getattr(placement, "launcher_apart", False)
    launcher = Replica(
        role="launcher",
        index=0,
        host=placement.endpoint("launcher", 0, 0).host if apart else hosts[0],
        port=None,
        argv=argv,
        env=env,
        ranks=list(range(dist.world_size)),
        decides_success=True,
        files=files,
        rank_logs=RANK_LOGS if dist.controller == "mpi" else None,
    )
    return JobPlan(
        run_id=run_id,
        framework=job.framework,
        distribution=dist.kind,
        success_policy="chief",
        replicas=[launcher],
        world_size=dist.world_size,
        secret_names=sorted(job.environment.secrets),
        hosts=hosts,
    )
