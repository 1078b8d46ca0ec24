#!/usr/bin/env bash
# Build and install Horovod 0.28.1 for one Python environment, with a wheel cache keyed on the Python,
# torch and TensorFlow versions it is built against (the wheel only works with exactly those).
#
#   scripts/build-horovod.sh PYTHON
#
# Horovod's last release (0.28.1, 2023) does not build against current PyTorch/TensorFlow headers as
# released: they need C++17 where Horovod asks for C++14, and its XLA ops need a header TensorFlow no
# longer ships. Three one-line patches make it build. Needs Debian's openmpi-bin libopenmpi-dev cmake g++.
# Environment: HOROVOD_WHEEL_CACHE (default ~/.cache/dnntrain/wheels); HOROVOD_GPU_OPERATIONS=NCCL (and
# a CUDA toolkit) for a GPU build.
set -euo pipefail

PYTHON=${1:?usage: build-horovod.sh PYTHON}
# Absolute, but not resolved: a venv's python is a symlink whose target is outside the venv.
PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"
VERSION=0.28.1
CACHE=${HOROVOD_WHEEL_CACHE:-$HOME/.cache/dnntrain/wheels}

key=$("$PYTHON" - <<'PY'
import importlib.metadata as metadata
import sys

def version(*names):
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return "none"

print(f"py{sys.version_info[0]}{sys.version_info[1]}-torch{version('torch')}-tf{version('tensorflow-cpu', 'tensorflow')}")
PY
)
wheel_dir="$CACHE/horovod-$VERSION-$key${HOROVOD_GPU_OPERATIONS:+-gpu}"

if ! compgen -G "$wheel_dir/horovod-*.whl" > /dev/null; then
    echo "Building Horovod $VERSION for $key (a few minutes; cached in $wheel_dir)"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PYTHON" -m pip install --quiet --disable-pip-version-check setuptools wheel
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
        "horovod==$VERSION" -d "$work"
    tar -xzf "$work/horovod-$VERSION.tar.gz" -C "$work"
    cd "$work/horovod-$VERSION"
    sed -i 's/^set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' CMakeLists.txt
    sed -i 's/    set(CMAKE_CXX_STANDARD 14)/    set(CMAKE_CXX_STANDARD 17)/' horovod/torch/CMakeLists.txt
    sed -i '/xla_mpi_ops.cc/d' horovod/tensorflow/CMakeLists.txt
    has() { "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
    export HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_MXNET=1
    if has torch; then export HOROVOD_WITH_PYTORCH=1; else export HOROVOD_WITHOUT_PYTORCH=1; fi
    if has tensorflow; then export HOROVOD_WITH_TENSORFLOW=1; else export HOROVOD_WITHOUT_TENSORFLOW=1; fi
    MAKEFLAGS="-j$(nproc)" "$PYTHON" -m pip wheel --quiet --disable-pip-version-check \
        --no-build-isolation --no-deps -w "$work/dist" .
    mkdir -p "$wheel_dir"
    mv "$work"/dist/horovod-*.whl "$wheel_dir/"
    cd - > /dev/null
fi

# With its small runtime dependencies (cloudpickle, psutil, pyyaml, packaging, cffi).
"$PYTHON" -m pip install --quiet --disable-pip-version-check "$wheel_dir"/horovod-*.whl
