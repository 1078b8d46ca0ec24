"""The house's rules, read off the code: arrows run down, modules and functions stay small, every module
says what it is for, and what is shipped to hosts and pods needs nothing but the standard library."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "airflow_provider_dnntrain"
NAME = PACKAGE.name
BACKENDS = ("local", "ssh", "kubernetes", "docker")
# Below the backends: they may use backends/common, never base.py or a backend.
GROUND_FLOOR = ("spec", "topology", "run_id", "source", "inputs", "tracking", "fs", "replica_site", "models")
SHIPPED = [
    "backends/common/reaper.py",
    "backends/common/host_cache.py",
    "backends/common/environments.py",
    "backends/common/endpoint_supervisor.py",  # run by path where models are served
    "backends/common/model_server.py",
    "backends/common/endpoint_agent.py",
    "backends/ssh/agent.py",
    "backends/docker/watchdog.py",
    "backends/common/bootstrap.py",
    "replica_site/sitecustomize.py",
    "replica_site/azureml_compat.py",
]
MAX_MODULE_LINES = 420  # ~400
MAX_FUNCTION_LINES = 60


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def dotted(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module of this package ``path`` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name == NAME or name.startswith(f"{NAME}.")}


def within(module: str, *packages: str) -> bool:
    return any(module == f"{NAME}.{p}" or module.startswith(f"{NAME}.{p}.") for p in packages)


def forbidden_for(module: str) -> tuple[str, ...]:
    """What ``module`` must not import, by its floor."""
    backends = tuple(f"backends.{b}" for b in BACKENDS)
    glue = ("operators", "triggers", "launchers", "cli")
    if within(module, *GROUND_FLOOR):
        return ("backends.base", *backends, *glue)
    if within(module, "backends.common"):
        return ("backends.base", *backends, *glue)
    if module == f"{NAME}.backends.base":
        return (*backends, *glue)
    for backend in BACKENDS:
        if within(module, f"backends.{backend}"):
            # A backend makes its own trigger (Launcher.trigger), and nothing of anyone else's.
            others = [f"triggers.{b}" for b in BACKENDS if b != backend]
            return (*[b for b in backends if b != f"backends.{backend}"], "operators", "launchers", *others)
    return ()


def test_arrows_run_down():
    wrong = [
        f"{dotted(path)} -> {used}"
        for path in modules()
        for used in sorted(imported(path))
        if within(used, *forbidden_for(dotted(path)))
    ]
    assert not wrong, f"imports that run up or across: {wrong}"


def module_level_imports(tree: ast.Module) -> list[str]:
    """The top packages a module imports when it is loaded (not inside functions, not for type checkers)."""
    roots: list[str] = []
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            continue
        if isinstance(node, ast.Import):
            roots += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.append(node.module.split(".")[0])
        elif isinstance(node, (ast.If, ast.Try)):
            pending += [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", [])]
            pending += [child for handler in getattr(node, "handlers", []) for child in handler.body]
    return roots


@pytest.mark.parametrize("relative", SHIPPED)
def test_what_is_shipped_to_hosts_and_pods_needs_only_the_standard_library(relative):
    """Loaded by a bare interpreter on a host or in a pod, beside the other shipped files."""
    path = PACKAGE / relative
    companions = {Path(shipped).stem for shipped in SHIPPED} | {NAME}  # the package: when imported here
    roots = module_level_imports(ast.parse(path.read_text()))
    foreign = sorted({r for r in roots if r not in sys.stdlib_module_names and r not in companions})
    assert not foreign, f"{relative} imports {foreign} when it is loaded"


def test_modules_and_functions_stay_small_and_say_what_they_are_for():
    too_long, undocumented, long_functions = [], [], []
    for path in modules():
        text = path.read_text()
        name = str(path.relative_to(PACKAGE))
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{name} ({text.count(chr(10))} lines)")
        if not text.startswith('"""'):
            undocumented.append(name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, f"modules over ~400 lines: {too_long}"
    assert not undocumented, f"modules whose first line does not say what they are for: {undocumented}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


def test_the_public_names_import_from_where_dags_name_them():
    from airflow_provider_dnntrain import launchers
    from airflow_provider_dnntrain.backends.kubernetes.launcher import KubernetesLauncher
    from airflow_provider_dnntrain.backends.local.launcher import LocalLauncher
    from airflow_provider_dnntrain.backends.ssh.launcher import SSHLauncher
    from airflow_provider_dnntrain.launchers.kubernetes import KubernetesLauncher as old_kubernetes
    from airflow_provider_dnntrain.launchers.local import LocalLauncher as old_local
    from airflow_provider_dnntrain.launchers.ssh import SSHLauncher as old_ssh

    assert (launchers.LocalLauncher, launchers.SSHLauncher, launchers.KubernetesLauncher) == (
        LocalLauncher,
        SSHLauncher,
        KubernetesLauncher,
    )
    assert (old_local, old_ssh, old_kubernetes) == (LocalLauncher, SSHLauncher, KubernetesLauncher)
    from airflow_provider_dnntrain.backends.docker.launcher import DockerLauncher

    assert launchers.DockerLauncher is DockerLauncher
    with pytest.raises(AttributeError, match="no attribute 'SlurmLauncher'"):
        launchers.SlurmLauncher  # noqa: B018


def test_naming_one_launcher_imports_no_other_backend():
    code = (
        "import sys; from airflow_provider_dnntrain.launchers import LocalLauncher; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('airflow_provider_dnntrain.'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", f"import json; {code}"], capture_output=True, text=True, check=True
    )
    loaded = json.loads(out.stdout)
    assert any(m.startswith(f"{NAME}.backends.local") for m in loaded)
    assert not [m for m in loaded if m.startswith((f"{NAME}.backends.ssh", f"{NAME}.backends.kubernetes"))]
