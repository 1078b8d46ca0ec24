from __future__ import annotations

import pytest
from pydantic import ValidationError

from airflow_provider_dnntrain.spec import (
    Environment,
    Horovod,
    Input,
    MultiWorkerMirrored,
    ParameterServer,
    TorchDistributed,
    TrainingJob,
)


def job(**overrides):
    fields = {"framework": "tensorflow", "source_directory": "src", "entry_script": "train.py"}
    return TrainingJob(**{**fields, **overrides})


def error_locations(excinfo) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in excinfo.value.errors()]


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: ParameterServer(worker_count=0), "worker_count"),
        (lambda: ParameterServer(parameter_server_count=0), "parameter_server_count"),
        (lambda: MultiWorkerMirrored(worker_count=0), "worker_count"),
        (lambda: TorchDistributed(process_count_per_node=0), "process_count_per_node"),
        (lambda: TorchDistributed(node_count=0), "node_count"),
        (lambda: TorchDistributed(workers=2), "workers"),
    ],
)
def test_invalid_distribution_names_the_field(make, field):
    with pytest.raises(ValidationError) as excinfo:
        make()
    assert error_locations(excinfo) == [field]


def test_unknown_job_key_is_rejected():
    with pytest.raises(ValidationError) as excinfo:
        job(entry_scrpt="x.py")
    assert error_locations(excinfo) == ["entry_scrpt"]


def test_parameter_server_on_pytorch_is_rejected():
    with pytest.raises(ValidationError, match="'parameter_server' is not a pytorch topology"):
        job(framework="pytorch", distribution=ParameterServer())


def test_torchrun_on_tensorflow_is_rejected():
    with pytest.raises(ValidationError, match="'torch_distributed' is not a tensorflow topology"):
        job(distribution=TorchDistributed())


def test_distribution_from_plain_mapping():
    parsed = job(distribution={"kind": "parameter_server", "worker_count": 3})
    assert parsed.distribution == ParameterServer(worker_count=3)


def test_elastic_requires_c10d():
    with pytest.raises(ValidationError, match="requires rendezvous='c10d'"):
        TorchDistributed(node_count=2, min_nodes=1)
    assert TorchDistributed(node_count=2, min_nodes=1, rendezvous="c10d").min_nodes == 1


@pytest.mark.parametrize("script", ["/abs/train.py", "../train.py", "a/../../train.py"])
def test_entry_script_must_stay_inside_source(script):
    with pytest.raises(ValidationError) as excinfo:
        job(entry_script=script)
    assert error_locations(excinfo) == ["entry_script"]


def test_arguments_list_and_mapping_flatten_literally():
    hostile = "; rm -rf / $(id) `x`\n'\""
    assert job(arguments=["--lr", 0.1, hostile, True]).argv() == ["--lr", "0.1", hostile, "true"]
    assert job(arguments={"--epochs": 3, "--verbose": None, "--name": hostile}).argv() == [
        "--epochs",
        "3",
        "--verbose",
        "--name",
        hostile,
    ]


def test_arguments_reject_nested_values():
    with pytest.raises(ValidationError) as excinfo:
        job(arguments=[["nested"]])
    assert error_locations(excinfo)[0].startswith("arguments")


def test_inputs_add_arguments_and_must_be_unique():
    parsed = job(
        arguments=["--epochs", "1"], inputs=[Input(name="digits", path="/data/d", argument="--data")]
    )
    assert parsed.argv() == ["--epochs", "1", "--data", "/data/d"]
    with pytest.raises(ValidationError, match="names must be unique"):
        job(inputs=[Input(name="a", path="/x"), Input(name="a", path="/y")])


def test_environment_variable_names_are_checked():
    with pytest.raises(ValidationError) as excinfo:
        job(environment={"variables": {"BAD-NAME": "1"}})
    assert error_locations(excinfo) == ["environment.variables"]


def test_horovod_on_both_frameworks_and_mpirun_needs_the_mpi_controller():
    for framework in ("tensorflow", "pytorch"):
        assert (
            job(
                framework=framework, distribution={"kind": "horovod", "node_count": 2}
            ).distribution.world_size
            == 2
        )
    with pytest.raises(ValidationError, match="runner='mpirun' starts ranks with Open MPI"):
        Horovod(runner="mpirun", controller="gloo")
    with pytest.raises(ValidationError) as excinfo:
        Horovod(process_count_per_node=0)
    assert error_locations(excinfo) == ["process_count_per_node"]


def test_pip_packages_from_conf_cannot_become_installer_options():
    for hostile in [
        "--index-url=http://evil/simple",
        "-e git+https://evil/x",
        "ok==1\n--extra-index-url x",
        " ",
    ]:
        with pytest.raises(ValidationError, match="is not a package requirement"):
            Environment(pip_packages=[hostile])
    assert Environment(pip_packages=["torchvision==0.21.0", "numpy>=2"]).has_packages
    assert not Environment().has_packages
