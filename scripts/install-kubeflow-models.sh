#!/usr/bin/env bash
# The Kubeflow training SDK's models (TFJob, PyTorchJob...), which the tests check the Kubeflow form
# against, into a folder of their own: kubeflow-training 1.9.4, the last release for the v1 training
# operator, requires kubernetes<36 while the cncf-kubernetes provider requires kubernetes>=36, so it
# cannot be a dependency. Its models need only six (already installed).
# Usage: install-kubeflow-models.sh <python> <target folder>
set -euo pipefail
python=$1
target=$2
rm -rf "$target"
"$python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$target" \
	kubeflow-training==1.9.4
