#!/usr/bin/env bash
# KServe's SDK (its InferenceService models), which the tests check the InferenceService form against,
# into a folder of its own: the SDK's package also carries KServe's model server, whose dependencies
# (grpcio, ray...) the provider has no use for. Its models need only six and the kubernetes client.
# Usage: install-kserve-models.sh <python> <target folder>
set -euo pipefail
python=$1
target=$2
rm -rf "$target"
"$python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$target" kserve==0.21.0
