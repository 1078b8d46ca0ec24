"""``dnntrain``: look at a job's plan before launching it, at the models registered since, and clear
away Kubernetes runs whose tasks are gone."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from airflow_provider_dnntrain.source import check_source
from airflow_provider_dnntrain.spec import TrainingJob
from airflow_provider_dnntrain.topology import placeholder_placement, render_plan


def load_job(path: Path) -> TrainingJob:
    """A job file is YAML or JSON with TrainingJob's fields; a relative source_directory is relative
    to the file."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of job fields")
    source = Path(data.get("source_directory", "."))
    data["source_directory"] = str(source if source.is_absolute() else (path.parent / source).resolve())
    return TrainingJob(**data)


def render_command(args: argparse.Namespace) -> int:
    job = load_job(Path(args.job_file))
    check_source(job)
    if args.launcher == "kubernetes":
        from airflow_provider_dnntrain.backends.kubernetes.launcher import KubernetesLauncher

        options = {"image": args.image} if args.image else {}
        launcher = KubernetesLauncher(namespace=args.namespace, python=args.python, **options)
        print(yaml.safe_dump_all(launcher.preview_objects(job, args.run_id), sort_keys=False), end="")
        return 0
    plan = render_plan(job, args.run_id, placeholder_placement(), python=args.python)
    print(plan.to_json())
    return 0


def models_command(args: argparse.Namespace) -> int:
    from airflow_provider_dnntrain import tracking

    client = tracking.client(tracking.resolve_tracking_uri(args.tracking_uri, conn_id=None))
    for model in client.search_registered_models():
        latest = max(
            (int(v.version) for v in client.search_model_versions(f"name = '{model.name}'")), default=0
        )
        print(json.dumps({"model": model.name, "latest_version": latest}))
    return 0


def gc_command(args: argparse.Namespace) -> int:
    from airflow_provider_dnntrain.backends.kubernetes.launcher import KubernetesLauncher

    launcher = KubernetesLauncher(kubernetes_conn_id=args.kubernetes_conn_id, namespace=args.namespace)
    namespace = launcher.namespace or launcher.hook.get_namespace() or "default"
    for name in launcher.cluster.unwatched_runs(namespace, args.older_than):
        launcher.cluster.delete_run(namespace, name)
        print(json.dumps({"deleted": name, "namespace": namespace}))
    return 0


def endpoints_command(args: argparse.Namespace) -> int:
    """The endpoints this host serves (LocalServing): list them, call one with its key, take one down."""
    from airflow_provider_dnntrain.backends.local.serving import LocalServing

    serving = LocalServing()
    if args.action == "list":
        for name in serving.endpoints():
            state = serving.current(name)
            print(json.dumps({"endpoint": name, "serving": state.serving, "scoring_uri": state.scoring_uri}))
        return 0
    if not args.endpoint:
        raise ValueError(f"endpoints {args.action}: name the endpoint")
    if args.action == "undeploy":
        with serving.locked(args.endpoint):
            print(json.dumps({"endpoint": args.endpoint, "removed": serving.undeploy(args.endpoint)}))
        return 0
    return _call_endpoint(serving, args.endpoint)


def _call_endpoint(serving, endpoint: str) -> int:
    """Send the serving version's own example, with the key, and say how a user would."""
    from airflow.models import Variable

    from airflow_provider_dnntrain.operators.deploy import key_variable
    from airflow_provider_dnntrain.operators.smoke import post

    state, model_dir = serving.current(endpoint), serving.served_model_dir(endpoint)
    if model_dir is None:
        raise ValueError(f"endpoint {endpoint!r} serves nothing")
    example = Path(model_dir) / "serving_input_example.json"
    key = Variable.get(key_variable(endpoint))
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    status, answer = post(state.scoring_uri, json.loads(example.read_text()), headers)
    print(f"{state.serving} at {state.scoring_uri} answered {status}: {json.dumps(answer)[:600]}")
    print(
        f'curl -H "Authorization: Bearer $(airflow variables get {key_variable(endpoint)})" '
        f"-H 'Content-Type: application/json' -d @{example} {state.scoring_uri}"
    )
    return 0 if status == 200 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dnntrain", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser(
        "render",
        help="print the plan of a job file (YAML or JSON) as JSON, or with --launcher kubernetes the "
        "objects a run would create (YAML, secrets masked)",
    )
    render.add_argument("job_file")
    render.add_argument("--run-id", default="dry-run")
    render.add_argument("--python", default="python", help="interpreter shown in the commands")
    render.add_argument("--launcher", choices=["local", "kubernetes"], default="local")
    render.add_argument("--namespace", default="default", help="kubernetes: the run's namespace")
    render.add_argument("--image", default=None, help="kubernetes: the pods' image")
    render.set_defaults(func=render_command)
    models = commands.add_parser("models", help="list registered models and their latest version")
    models.add_argument("--tracking-uri", default=None)
    models.set_defaults(func=models_command)
    gc = commands.add_parser(
        "gc",
        help="delete the Kubernetes runs nobody watches any more (their lease was not renewed for "
        "--older-than seconds: their tasks are gone), and everything they own",
    )
    gc.add_argument("--kubernetes-conn-id", default="kubernetes_default")
    gc.add_argument("--namespace", default=None, help="default: the connection's")
    gc.add_argument("--older-than", type=float, default=600.0, help="seconds (at least orphan_timeout)")
    gc.set_defaults(func=gc_command)
    endpoints = commands.add_parser(
        "endpoints", help="the endpoints this host serves: list, call one with its key, undeploy one"
    )
    endpoints.add_argument("action", choices=["list", "call", "undeploy"])
    endpoints.add_argument("endpoint", nargs="?")
    endpoints.set_defaults(func=endpoints_command)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as error:  # pydantic's ValidationError is a ValueError
        print(f"dnntrain: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
