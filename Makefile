# Two commands matter: `make demo` and `make test`. Both create the environment first if it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS := tensorflow,torch,ssh,kubernetes,docker,s3,examples,test
# Open MPI and a compiler for Horovod (built from source by scripts/build-horovod.sh, wheel cached);
# sshd, ssh and ip for the test hosts (tests/ssh_hosts.py: sshd in network namespaces); Docker's
# daemon, a registry and debootstrap for the Docker backend's tests (tests/docker_daemon.py: its own
# dockerd, and images made here, not pulled; tests/docker_registry.py).
DEBIAN_PACKAGES := openmpi-bin libopenmpi-dev cmake g++ make openssh-server openssh-client iproute2 \
	docker.io docker-registry debootstrap
# Rebuilt when the dependency declarations change.
STAMP := $(VENV)/.installed-$(shell echo $(DEBIAN_PACKAGES) | cat - pyproject.toml constraints.txt scripts/*.sh \
	| sha256sum | cut -c1-12)
DEMO_HOME := $(CURDIR)/.demo/airflow
DEMO_DAG ?= dnntrain_deploy_digits
# A DAG that deploys: the demo then calls its endpoint (as a user would: the curl line is printed, key
# elided) and takes it down.
DEMO_ENDPOINT = $(if $(findstring _deploy_,$(DEMO_DAG)),digits)
# DAGs on the SSH launcher run against three sshd hosts started on this machine for the demo.
DEMO_HOSTS = $(if $(findstring _ssh_,$(DEMO_DAG)),$(BIN)/python scripts/with_ssh_hosts.py --)
AIRFLOW_ENV := AIRFLOW_HOME=$(DEMO_HOME) AIRFLOW__CORE__LOAD_EXAMPLES=False \
	AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags TF_CPP_MIN_LOG_LEVEL=2

.PHONY: env demo test lint clean images images-test

env: $(STAMP)

$(STAMP):
	rm -f $(VENV)/.installed-*
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv
	# pip, not uv: pip's configured find-links hold the CPU build of torch; uv would fetch the CUDA one.
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	# Bytecode now: uv does not write it, and without it every task pays seconds compiling Airflow and MLflow.
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -c constraints.txt -e ".[$(EXTRAS)]"
	scripts/install-debian-packages.sh $(DEBIAN_PACKAGES)
	scripts/build-horovod.sh $(BIN)/python
	scripts/install-kubeflow-models.sh $(BIN)/python $(VENV)/kubeflow-models
	scripts/install-kserve-models.sh $(BIN)/python $(VENV)/kserve-models
	touch $@

demo: $(STAMP)
	mkdir -p $(DEMO_HOME)
	$(AIRFLOW_ENV) $(BIN)/airflow db migrate > $(DEMO_HOME)/../db-migrate.log 2>&1
	@echo "Running $(DEMO_DAG) with 'airflow dags test' (log: .demo/$(DEMO_DAG).log) ..."
	@$(AIRFLOW_ENV) PATH=$(CURDIR)/$(BIN):$$PATH $(DEMO_HOSTS) $(BIN)/airflow dags test $(DEMO_DAG) \
		> .demo/$(DEMO_DAG).log 2>&1 || { tail -n 60 .demo/$(DEMO_DAG).log; exit 1; }
	@grep -o '\[[a-z0-9./-]*\] \(\[[a-z0-9]*\]:\|\[[0-9]\]<stdout>:\)\?epoch=[0-9]* loss=[0-9.]* accuracy=[0-9.]*' \
		.demo/$(DEMO_DAG).log || true
	@grep -o 'Registered model .* version [0-9]* from run [a-z0-9-]*' .demo/$(DEMO_DAG).log
	@grep -o 'Endpoint [a-z0-9-]* serves .*' .demo/$(DEMO_DAG).log | cut -d'[' -f1 || true
	@if [ -n "$(DEMO_ENDPOINT)" ]; then \
		$(AIRFLOW_ENV) $(BIN)/dnntrain endpoints call $(DEMO_ENDPOINT) \
		&& $(AIRFLOW_ENV) $(BIN)/dnntrain endpoints undeploy $(DEMO_ENDPOINT); fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) lint images-test
	$(BIN)/python -m pytest -p no:cacheprovider -n 2 --dist loadscope --durations=15

# The images the Docker backend's tests run: built once, again when what they are built from changes.
images-test: $(STAMP)
	$(BIN)/python tests/docker_daemon.py images

# Training images (not part of the tests): dnntrain-{torch,tensorflow}:$(DEVICE), DEVICE=cpu|gpu.
# DOCKER="docker -H unix:///..." and BASE_IMAGE=... to override.
DOCKER ?= docker
BASE_IMAGE ?= debian:bookworm-slim
DEVICE ?= cpu
images:
	for framework in torch tensorflow; do \
		$(DOCKER) build --network host -f docker/Dockerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) \
			--build-arg FRAMEWORK=$$framework --build-arg DEVICE=$(DEVICE) \
			-t dnntrain-$$framework:$(DEVICE) . || exit 1; \
	done

clean:
	rm -rf .demo
