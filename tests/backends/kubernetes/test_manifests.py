"""Every object the Kubernetes launcher would create, for every topology, validated against the
Kubernetes API's schemas (kubernetes-validate, strict: an unknown field fails) - no cluster needed."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubeflow_schema import KubeflowSchemaError, validate_kubeflow

from airflow_provider_dnntrain.backends.kubernetes.launcher import KubernetesLauncher
from airflow_provider_dnntrain.backends.kubernetes.manifests import job_name
from airflow_provider_dnntrain.spec import (
    Horovod,
    MultiWorkerMirrored,
    ParameterServer,
    SingleNode,
    TorchDistributed,
    TrainingJob,
)

KUBERNETES_VERSION = "1.37.0"
EXAMPLE_SCRIPTS = Path(__file__).resolve().parents[3] / "dags" / "scripts"
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
SECRET = "s3cr3t-value-never-inline"

TOPOLOGIES = {
    "single": ("pytorch", SingleNode()),
    "ps": ("tensorflow", ParameterServer(worker_count=2, parameter_server_count=2, evaluator=True)),
    "mirrored": ("tensorflow", MultiWorkerMirrored(worker_count=3)),
    "ddp-static": ("pytorch", TorchDistributed(node_count=2, process_count_per_node=2)),
    "ddp-c10d": ("pytorch", TorchDistributed(node_count=3, rendezvous="c10d", min_nodes=2)),
    "horovod-gloo": ("pytorch", Horovod(node_count=3, process_count_per_node=2)),
    "horovod-mpirun": ("tensorflow", Horovod(node_count=2, runner="mpirun", controller="mpi")),
}

KPO_OPTIONS = {
    "labels": {"team": "vision"},
    "annotations": {"example.com/owner": "ml-platform"},
    "node_selector": {"pool": "training"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                ]
            }
        }
    },
    "service_account_name": "trainer",
    "image_pull_secrets": "registry-a, registry-b",
    "image_pull_policy": "IfNotPresent",
    "volumes": [
        {"name": "data", "persistentVolumeClaim": {"claimName": "digits", "readOnly": True}},
        {"name": "config", "configMap": {"name": "training-config"}},
        {"name": "cache", "hostPath": {"path": "/var/cache/datasets", "type": "DirectoryOrCreate"}},
    ],
    "volume_mounts": [
        {"name": "data", "mountPath": "/data", "readOnly": True},
        {"name": "config", "mountPath": "/etc/training"},
        {"name": "cache", "mountPath": "/cache"},
    ],
    "security_context": {"runAsUser": 1000, "fsGroup": 1000},
    "container_security_context": {"allowPrivilegeEscalation": False},
    "priority_class_name": "training",
    "env_vars": {"EXTRA": "1"},
}


def job_for(topology: str, use_gpu: bool = False) -> TrainingJob:
    framework, distribution = TOPOLOGIES[topology]
    return TrainingJob(
        framework=framework,
        source_directory=str(EXAMPLE_SCRIPTS),
        entry_script="digits.py",
        arguments=["--epochs", "1", "; rm -rf / #"],
        distribution=distribution,
        environment={"variables": {"PLAIN": "visible"}, "secrets": {"API_TOKEN": SECRET}},
        resources={"use_gpu": use_gpu, "cpu": 2, "memory": "4Gi"},
    )


def validate_all(objects: list[dict]) -> None:
    for obj in objects:
        if obj["kind"] == "PodGroup":
            continue  # a CRD's object: see test_pod_groups_for_gang_schedulers
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            first = str(error).splitlines()[0]
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {first} at {list(error.path)}")


def pods_of(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "Pod"}


def env_of(pod: dict) -> dict[str, dict]:
    return {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}


@pytest.mark.parametrize("use_gpu", [False, True], ids=["cpu", "gpu"])
@pytest.mark.parametrize("topology", sorted(TOPOLOGIES))
def test_every_topology_renders_objects_the_api_accepts(topology, use_gpu):
    launcher = KubernetesLauncher(namespace="ml", **KPO_OPTIONS)
    run_id = "dnntrain-example-train-manual-2026-11-24t10-00-00-t1-0123456789"
    objects = launcher.preview_objects(job_for(topology, use_gpu), run_id)
    validate_all(objects)
    job = job_name(run_id)
    kinds = [o["kind"] for o in objects]
    assert kinds[:3] == ["ConfigMap", "Secret", "Service"]
    owner = objects[0]
    for child in objects[1:]:
        assert child["metadata"]["ownerReferences"][0]["name"] == owner["metadata"]["name"] == job
        assert child["metadata"]["namespace"] == "ml"
    service = objects[2]["spec"]
    assert service["clusterIP"] == "None" and service["publishNotReadyAddresses"] is True
    pods = pods_of(objects)
    for name, pod in pods.items():
        assert DNS_LABEL.match(name) and len(f"{name}.{job}") <= 253
        spec = pod["spec"]
        assert (spec["hostname"], spec["subdomain"]) == (name, job)
        assert spec["restartPolicy"] == "Never"
        assert spec["serviceAccountName"] == "trainer" and spec["nodeSelector"] == {"pool": "training"}
        assert spec["imagePullSecrets"] == [{"name": "registry-a"}, {"name": "registry-b"}]
        main = spec["containers"][0]
        assert main["name"] == "base"
        framework = "torch" if TOPOLOGIES[topology][0] == "pytorch" else "tensorflow"
        assert main["image"] == f"dnntrain-{framework}:{'gpu' if use_gpu else 'cpu'}"
        assert {"/data", "/etc/training", "/cache"} <= {m["mountPath"] for m in main["volumeMounts"]}
        env = env_of(pod)
        assert env["API_TOKEN"] == {
            "name": "API_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": job, "key": "env.API_TOKEN"}},
        }
        assert env["EXTRA"]["value"] == "1"
        gpus = main["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert (gpus is not None) == (use_gpu and "-ps-" not in name)  # parameter servers compute nothing
        if gpus is not None and pod["metadata"]["labels"]["dnntrain/role"] != "node":  # ranks: from runner
            assert env["CUDA_VISIBLE_DEVICES"]["value"] == ",".join(map(str, range(int(gpus))))
    assert SECRET not in json.dumps([o for o in objects if o["kind"] != "Secret"])
    assert objects[1]["data"] == {"env.API_TOKEN": "***"}


def test_host_names_are_the_topologys_and_resolve_through_the_service():
    run_id = "a" * 40 + "-t1-0123456789"
    objects = KubernetesLauncher(namespace="ml").preview_objects(job_for("ps"), run_id)
    job = job_name(run_id)
    pods = pods_of(objects)
    assert sorted(pods) == sorted(
        f"{job}-{role}" for role in ("chief-0", "ps-0", "ps-1", "worker-0", "worker-1", "evaluator-0")
    )
    tf_config = json.loads(env_of(pods[f"{job}-worker-1"])["TF_CONFIG"]["value"])
    assert tf_config["cluster"]["ps"] == [f"{job}-ps-0.{job}:2222", f"{job}-ps-1.{job}:2222"]
    assert tf_config["task"] == {"type": "worker", "index": 1}
    chief = pods[f"{job}-chief-0"]["spec"]["containers"]
    assert [c["name"] for c in chief] == ["base", "outputs"]  # the chief's outputs outlive its script
    assert all(len(pods[p]["spec"]["containers"]) == 1 for p in pods if "chief" not in p)
    # Arguments reach the script as argv, literally: no shell anywhere.
    main = pods[f"{job}-worker-0"]["spec"]["containers"][0]
    assert main["args"][-1] == "; rm -rf / #" and main["command"][0] == "python"


def test_torchrun_nodes_meet_at_node_zero():
    objects = KubernetesLauncher(namespace="ml").preview_objects(job_for("ddp-static", use_gpu=True), "ddp")
    job = job_name("ddp")
    pods = pods_of(objects)
    node1 = pods[f"{job}-node-1"]["spec"]["containers"][0]
    assert env_of(pods[f"{job}-node-1"])["MASTER_ADDR"]["value"] == f"{job}-node-0.{job}"
    assert node1["args"][node1["args"].index("--master-addr") + 1] == f"{job}-node-0.{job}"
    assert node1["resources"]["limits"]["nvidia.com/gpu"] == "2"  # one per process of the node


def test_horovod_nodes_run_sshd_and_the_launcher_waits_for_them():
    job_spec = job_for("horovod-mpirun", use_gpu=True)
    objects = KubernetesLauncher(namespace="ml").preview_objects(job_spec, "hvd")
    job = job_name("hvd")
    pods = pods_of(objects)
    assert sorted(pods) == [f"{job}-node-0", f"{job}-node-1"]
    launcher_pod = pods[f"{job}-node-0"]["spec"]["containers"][0]
    # The runner waits for the other node's sshd; both pods pass on what ranks write to per-rank files.
    assert launcher_pod["command"][2:] == [
        "run",
        "--ssh-peer",
        f"{job}-node-1.{job}",
        "--rank-logs",
        "logs/ranks",
        "--orphan-timeout",  # every pod ends itself once nobody watches the run (the lease lapses)
        "300",
    ]
    assert "mpirun" in launcher_pod["args"]
    node = pods[f"{job}-node-1"]["spec"]["containers"][0]
    lease = ["--orphan-timeout", "300"]
    assert node["command"][2:] == ["sshd", "--port", "2222", "--rank-logs", "logs/ranks", *lease]
    assert node["resources"]["limits"]["nvidia.com/gpu"] == "1"
    ssh_volume = next(v for v in pods[f"{job}-node-1"]["spec"]["volumes"] if v["name"] == "ssh")
    assert {i["key"] for i in ssh_volume["secret"]["items"]} == {
        "ssh.id",
        "ssh.authorized_keys",
        "ssh.host_key",
        "ssh.known_hosts",
    }
    hostfile = objects[0]["binaryData"]["files.json"]
    assert hostfile.startswith("<")  # shown by size in a preview


def test_role_options_replace_the_jobs_for_that_role():
    launcher = KubernetesLauncher(
        namespace="ml",
        node_selector={"pool": "gpu"},
        container_resources={"limits": {"nvidia.com/gpu": "1"}},
        role_options={"ps": {"node_selector": {"pool": "cpu"}, "container_resources": {"limits": {}}}},
    )
    pods = pods_of(launcher.preview_objects(job_for("ps"), "roles"))
    job = job_name("roles")
    assert pods[f"{job}-ps-0"]["spec"]["nodeSelector"] == {"pool": "cpu"}
    assert pods[f"{job}-worker-0"]["spec"]["nodeSelector"] == {"pool": "gpu"}
    assert "nvidia.com/gpu" not in json.dumps(pods[f"{job}-ps-0"]["spec"]["containers"][0]["resources"])


def test_a_pod_template_file_is_the_base_of_every_pod(tmp_path):
    template = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"labels": {"from-template": "yes"}},
        "spec": {
            "nodeSelector": {"disk": "ssd"},
            "containers": [{"name": "base", "env": [{"name": "FROM_TEMPLATE", "value": "1"}]}],
            "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}],
        },
    }
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(template))
    launcher = KubernetesLauncher(namespace="ml", pod_template_file=str(path))
    objects = launcher.preview_objects(job_for("mirrored"), "templated")
    validate_all(objects)
    for pod in pods_of(objects).values():
        assert pod["metadata"]["labels"]["from-template"] == "yes"
        assert pod["spec"]["nodeSelector"] == {"disk": "ssd"}
        assert "shm" in {v["name"] for v in pod["spec"]["volumes"]}
        assert {"FROM_TEMPLATE", "TF_CONFIG"} <= set(env_of(pod))


@pytest.mark.parametrize("scheduler", ["kueue", "volcano", "coscheduling"])
def test_pod_groups_for_gang_schedulers(scheduler):
    launcher = KubernetesLauncher(namespace="ml", gang_scheduling=scheduler, queue_name="team-a")
    objects = launcher.preview_objects(job_for("ps"), "gang")
    validate_all(objects)
    pods = pods_of(objects)
    groups = [o for o in objects if o["kind"] == "PodGroup"]
    if scheduler == "kueue":
        assert not groups
        for pod in pods.values():
            assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
            assert pod["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == str(len(pods))
    else:
        assert groups[0]["spec"]["minMember"] == len(pods) == 6
        assert all(pod["spec"]["schedulerName"] for pod in pods.values())


def test_unknown_options_and_oversized_sources_are_named():
    with pytest.raises(ValueError, match="node_selecter"):
        KubernetesLauncher(node_selecter={"a": "b"})
    with pytest.raises(ValueError, match="image_pull_policy"):
        KubernetesLauncher(image_pull_policy="Sometimes")


def test_a_source_too_large_for_a_config_map_is_refused(tmp_path):
    (tmp_path / "train.py").write_text("print('hi')\n")
    (tmp_path / "weights.bin").write_bytes(os.urandom(1024 * 1024))  # does not compress
    job = TrainingJob(framework="pytorch", source_directory=str(tmp_path), entry_script="train.py")
    with pytest.raises(ValueError, match="^source_directory: .*ConfigMap"):
        KubernetesLauncher(namespace="ml").preview_objects(job, "big")


def test_an_operators_dry_run_shows_the_objects(capsys):
    from airflow_provider_dnntrain.operators import TensorFlowTrainOperator

    op = TensorFlowTrainOperator(
        task_id="train",
        source_directory=str(EXAMPLE_SCRIPTS),
        entry_script="digits.py",
        distribution=MultiWorkerMirrored(worker_count=2),
        secret_variables={"API_TOKEN": SECRET},
        launcher=KubernetesLauncher(namespace="ml"),
    )
    shown = op.dry_run()
    printed = capsys.readouterr().out
    assert [o["kind"] for o in shown["objects"]] == ["ConfigMap", "Secret", "Service", "Pod", "Pod"]
    assert [o["kind"] for o in yaml.safe_load_all(printed[printed.index("apiVersion") :])][-1] == "Pod"
    assert SECRET not in printed
    validate_all(shown["objects"])


def test_a_deferred_wait_needs_a_tracking_server_the_pods_reach():
    launcher = KubernetesLauncher(namespace="ml")
    with pytest.raises(ValueError, match="^deferrable: .* give the pods a tracking server"):
        launcher.check_deferrable({"MLFLOW_TRACKING_URI": "sqlite:////tmp/mlflow.db"})
    launcher.check_deferrable({"MLFLOW_TRACKING_URI": "http://mlflow.tracking.svc:5000"})


# horovodrun checks SSH to every host, which an MPIJob's pods do not run: mpirun is its runner.
KUBEFLOW_TOPOLOGIES = sorted(t for t in TOPOLOGIES if t != "horovod-gloo")
# kind, where its replica specs are, the container the operator's variables and webhooks name
KUBEFLOW_KINDS = {
    "tensorflow": ("TFJob", "tfReplicaSpecs", "tensorflow"),
    "pytorch": ("PyTorchJob", "pytorchReplicaSpecs", "pytorch"),
    "horovod": ("MPIJob", "mpiReplicaSpecs", "base"),
}


@pytest.mark.parametrize("use_gpu", [False, True], ids=["cpu", "gpu"])
@pytest.mark.parametrize("topology", KUBEFLOW_TOPOLOGIES)
def test_the_kubeflow_form_is_a_job_the_training_operator_accepts(topology, use_gpu):
    launcher = KubernetesLauncher(namespace="ml", kubeflow=True, **KPO_OPTIONS)
    job_spec = job_for(topology, use_gpu)
    objects = launcher.preview_objects(job_spec, "kf")
    horovod = job_spec.distribution.kind == "horovod"
    kind, specs_field, container = KUBEFLOW_KINDS["horovod" if horovod else job_spec.framework]
    assert [o["kind"] for o in objects] == ["ConfigMap", "Secret", kind]
    job = objects[2]
    validate_kubeflow(job)
    validate_all(objects[:2])
    assert SECRET not in json.dumps(objects)
    assert job["metadata"]["ownerReferences"][0]["kind"] == "ConfigMap"  # deleted with the run
    plan = launcher.preview(job_spec, "kf")
    specs = job["spec"][specs_field]
    assert sum(spec["replicas"] for spec in specs.values()) == len(plan.replicas) + (
        len(plan.hosts) if horovod else 0
    )
    for type_, spec in specs.items():
        main = spec["template"]["spec"]["containers"][0]
        assert main["name"] == container
        assert "; rm -rf / #" not in json.dumps(main)  # arguments come from the plan, never a shell
        if use_gpu and not horovod:
            gpus = main["resources"].get("limits", {}).get("nvidia.com/gpu")
            assert gpus == (None if type_ == "PS" else str(max(1, len(plan.replicas[0].ranks))))
    if kind == "PyTorchJob":
        assert specs["Master"]["replicas"] == 1
        assert job["spec"]["nprocPerNode"] == str(plan.world_size // len(plan.replicas))
    if kind == "MPIJob":
        assert_mpijob_runs_mpirun_through_the_operator(job, plan, use_gpu)


def assert_mpijob_runs_mpirun_through_the_operator(job: dict, plan, use_gpu: bool) -> None:
    """One launcher (no ranks, no GPU) running mpirun over the operator's hostfile of worker pods; workers
    that unpack the source before they run, hold the ranks (and worker 0 rank 0's outputs)."""
    specs = job["spec"]["mpiReplicaSpecs"]
    assert specs["Launcher"]["replicas"] == 1 and specs["Worker"]["replicas"] == len(plan.hosts) == 2
    assert job["spec"]["slotsPerWorker"] == plan.world_size // len(plan.hosts)
    assert job["spec"]["mainContainer"] == "base"
    assert plan.hosts == ["kf-worker-0", "kf-worker-1"]  # the operator's hostfile names the worker pods
    launcher = plan.replicas[0]
    assert launcher.host == "kf-launcher" and launcher.argv[0] == "mpirun"
    assert launcher.files["hostfile"] == "kf-worker-0 slots=1\nkf-worker-1 slots=1\n"
    assert "plm_rsh_args" not in launcher.argv  # no SSH port: ranks start through kubectl exec
    launcher_pod = specs["Launcher"]["template"]["spec"]
    worker_pod = specs["Worker"]["template"]["spec"]
    assert [c["name"] for c in launcher_pod["containers"]] == ["base"]
    assert "nvidia.com/gpu" not in json.dumps(launcher_pod["containers"][0]["resources"])
    assert [c["name"] for c in worker_pod["containers"]] == ["base", "outputs"]
    assert worker_pod["initContainers"][0]["command"][-1] == "unpack"
    lease = ["--orphan-timeout", "300"]
    assert worker_pod["containers"][0]["command"][2:] == ["hold", "--rank-logs", "logs/ranks", *lease]
    if use_gpu:
        assert worker_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "ssh" not in json.dumps([v["name"] for v in launcher_pod["volumes"] + worker_pod["volumes"]])


def test_the_kubeflow_schema_check_refuses_what_the_api_would():
    job = KubernetesLauncher(namespace="ml", kubeflow=True).preview_objects(job_for("ps"), "kf")[2]
    job["spec"]["runPolicy"]["cleanPodPolicyy"] = "None"
    with pytest.raises(KubeflowSchemaError, match=r"spec.runPolicy.cleanPodPolicyy: unknown field"):
        validate_kubeflow(job)
    job = KubernetesLauncher(namespace="ml", kubeflow=True).preview_objects(job_for("ps"), "kf")[2]
    job["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["imagePolicy"] = "x"
    with pytest.raises(KubeflowSchemaError, match="tfReplicaSpecs.Worker.template"):
        validate_kubeflow(job)
    del job["spec"]["tfReplicaSpecs"]
    with pytest.raises(KubeflowSchemaError, match="tfReplicaSpecs: required"):
        validate_kubeflow(job)


@pytest.mark.parametrize("scheduler", ["kueue", "volcano"])
def test_the_kubeflow_form_asks_the_operator_for_a_gang(scheduler):
    launcher = KubernetesLauncher(
        namespace="ml", kubeflow=True, gang_scheduling=scheduler, queue_name="team-a"
    )
    objects = launcher.preview_objects(job_for("ps"), "gang")
    job = objects[-1]
    validate_kubeflow(job)
    assert "PodGroup" not in [o["kind"] for o in objects]  # the operator makes its own
    if scheduler == "kueue":
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    else:
        assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 6, "queue": "team-a"}


def test_horovodrun_has_no_kubeflow_form_and_says_so_when_the_dag_is_parsed():
    from airflow_provider_dnntrain.operators import PyTorchHorovodOperator

    with pytest.raises(
        ValueError,
        match="^task .train.: invalid training job: distribution.runner: an MPIJob's launcher starts ranks "
        "through the operator's kubectl exec, which horovodrun cannot use",
    ):
        PyTorchHorovodOperator(
            task_id="train",
            source_directory=str(EXAMPLE_SCRIPTS),
            entry_script="digits.py",
            node_count=2,
            launcher=KubernetesLauncher(namespace="ml", kubeflow=True),
        )


def test_pip_packages_on_kubernetes_need_a_registry_and_then_name_the_environment_image():
    job = job_for("ps")
    job = job.model_copy(
        update={"environment": job.environment.model_copy(update={"pip_packages": ["x==1"]})}
    )
    with pytest.raises(ValueError, match=r"^environment.pip_packages: .* give the launcher a registry"):
        KubernetesLauncher(namespace="ml").validate(job)
    launcher = KubernetesLauncher(namespace="ml", image_registry="registry.example:5000/ml")
    image = launcher.pods.image(job)
    assert re.fullmatch(r"registry\.example:5000/ml/dnntrain-env:[0-9a-f]{20}", image)
    pods = [o for o in launcher.preview_objects(job, "env-preview") if o["kind"] == "Pod"]
    assert pods and all(c["image"] == image for pod in pods for c in pod["spec"]["containers"])
    other = job.model_copy(
        update={"environment": job.environment.model_copy(update={"pip_packages": ["x==2"]})}
    )
    assert launcher.pods.image(other) != image  # another content, another image
