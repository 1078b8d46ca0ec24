#!/usr/bin/env bash
# Build and install Horovod 0.28.1 for one Python environment, with a wheel cache keyed on the Python,
# torch and TensorFlow versions it is built against (the wheel only works with exactly those).
#
#   scripts/build-horovod.sh PYTHON
#
# Horovod's last release (0.28.1, 2023) does not build against current PyTorch/TensorFlow headers as
# released: they need C++17 where Horovod asks for C++14, and its XLA ops need a header TensorFlow no
# longer ships. Three one-line patches make it build; a fourth, for GPU builds with TensorFlow, replaces a
# stream-executor symbol TensorFlow stopped exporting. Needs Debian's openmpi-bin libopenmpi-dev cmake g++
# (and patchelf for a GPU build).
#
# Environment: HOROVOD_WHEEL_CACHE (default ~/.cache/dnntrain/wheels); HOROVOD_GPU_OPERATIONS=NCCL for a
# GPU build. A GPU build takes its CUDA toolkit and NCCL from the framework's own CUDA wheels (PyPI's
# torch pulls cuda-toolkit 13 with nvcc and nvidia-nccl-cu13; tensorflow[and-cuda] the nvidia-*-cu12
# wheels), so no GPU and no NVIDIA base image is needed to build; HOROVOD_CUDA_HOME (+ HOROVOD_NCCL_HOME)
# use a system toolkit instead. HOROVOD_BUILD_CUDA_CC_LIST defaults to the GPU architectures the
# installed frameworks were built for (scripts/cuda_architectures.py).
set -euo pipefail

PYTHON=${1:?usage: build-horovod.sh PYTHON}
# Absolute, but not resolved: a venv's python is a symlink whose target is outside the venv.
PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"
SCRIPTS=$(cd "$(dirname "$0")" && pwd)
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

# A CUDA home merged from the environment's nvidia/* wheel folders (symlinks; the tools are copied,
# because nvcc finds cicc, headers and libraries relative to where its binary lies). PyPI has no nvcc
# for CUDA 12 (nvidia-cuda-nvcc-cu12 holds only ptxas), so for TensorFlow's cu12 wheels a build-only
# CUDA 13 toolchain compiles Horovod's few kernels (static cudart: needs an NVIDIA driver >= 580).
use_cuda_from_wheels() {
    local home=$1 nvidia sources
    nvidia="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia"
    if [[ -z ${HOROVOD_CUDA_HOME:-} ]]; then
        [[ -f $nvidia/nccl/include/nccl.h ]] || {
            echo "No NCCL wheel in $nvidia: install the framework's CUDA build or set HOROVOD_CUDA_HOME" >&2
            exit 1
        }
        if compgen -G "$nvidia/*/bin/nvcc" > /dev/null; then
            sources=("$nvidia"/*/)
        else
            "$PYTHON" -m pip install --quiet --disable-pip-version-check --target "$home-toolkit" \
                "cuda-toolkit[nvcc,cccl,crt,cudart]==13.0.3"
            sources=("$home-toolkit"/nvidia/*/ "$nvidia/nccl/")
        fi
        mkdir -p "$home"
        for package in "${sources[@]}"; do
            cp -rs --no-clobber "$package". "$home/"
        done
        for tool in "$home"/bin/* "$home"/nvvm/bin/*; do
            if [[ -L $tool ]]; then cp --remove-destination "$(readlink "$tool")" "$tool"; fi
        done
        # Wheels ship only versioned libraries (libcudart.so.13, libnccl.so.2); the linker wants libX.so.
        for library in "$home"/lib/lib*.so.*; do
            [[ -e ${library%%.so.*}.so ]] || ln -s "$(basename "$library")" "${library%%.so.*}.so"
        done
        [[ -e $home/lib64 ]] || ln -s lib "$home/lib64"
        export HOROVOD_CUDA_HOME=$home HOROVOD_NCCL_HOME=${HOROVOD_NCCL_HOME:-$home}
        export HOROVOD_NCCL_LINK=${HOROVOD_NCCL_LINK:-SHARED}
    fi
    # Horovod asks torch.utils.cpp_extension whether torch has CUDA, which needs CUDA_HOME (or nvcc).
    export CUDA_HOME=${CUDA_HOME:-$HOROVOD_CUDA_HOME}
    if [[ -z ${HOROVOD_BUILD_CUDA_CC_LIST:-} ]]; then
        HOROVOD_BUILD_CUDA_CC_LIST=$(framework_cuda_architectures)
        export HOROVOD_BUILD_CUDA_CC_LIST
    fi
    echo "CUDA from $HOROVOD_CUDA_HOME, NCCL from $HOROVOD_NCCL_HOME, kernels for sm_{$HOROVOD_BUILD_CUDA_CC_LIST}"
}

# The libraries' RUNPATH names the temporary CUDA home they were linked in (under /tmp, which anyone can
# write to): point it at the NCCL wheel beside them instead. TensorFlow, unlike torch, does not load
# libnccl.so.2 before Horovod's library asks for it. Needs Debian's patchelf.
point_runpath_at_nccl_wheel() {
    local wheel=$1 unpacked=$work/unpacked library runpath
    "$PYTHON" -m wheel unpack -d "$unpacked" "$wheel" > /dev/null
    for library in "$unpacked"/horovod-*/horovod/*/mpi_lib*.so; do
        runpath=$(patchelf --print-rpath "$library" | tr ':' '\n' | { grep -v "^$work/" || true; } | paste -sd:)
        patchelf --set-rpath "${runpath:+$runpath:}\$ORIGIN/../../nvidia/nccl/lib" "$library"
    done
    rm "$wheel"
    "$PYTHON" -m wheel pack -d "$(dirname "$wheel")" "$unpacked"/horovod-* > /dev/null
}

framework_cuda_architectures() {
    local supported
    supported=$("$HOROVOD_CUDA_HOME/bin/nvcc" --list-gpu-arch | tr -dc '0-9\n' | paste -sd,)
    TF_CPP_MIN_LOG_LEVEL=3 "$PYTHON" "$SCRIPTS/cuda_architectures.py" "$supported"
}

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
    # GPU builds only: TensorFlow no longer exports stream_executor::gpu::AsGpuStreamValue; define it
    # from the public Stream::platform_specific_handle() instead.
    sed -i '/^GpuStreamHandle AsGpuStreamValue(Stream\* stream);$/d' horovod/tensorflow/mpi_ops.cc
    sed -i '/^#endif \/\/ TENSORFLOW_VERSION >= 2011000000$/a namespace stream_executor { namespace gpu {\
inline GpuStreamHandle AsGpuStreamValue(Stream* s) {\
  return static_cast<GpuStreamHandle>(s->platform_specific_handle().stream);\
} } }' horovod/tensorflow/mpi_ops.cc
    has() { "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
    if [[ -n ${HOROVOD_GPU_OPERATIONS:-} ]]; then
        use_cuda_from_wheels "$work/cuda"
    fi
    export HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_MXNET=1
    if has torch; then export HOROVOD_WITH_PYTORCH=1; else export HOROVOD_WITHOUT_PYTORCH=1; fi
    if has tensorflow; then export HOROVOD_WITH_TENSORFLOW=1; else export HOROVOD_WITHOUT_TENSORFLOW=1; fi
    MAKEFLAGS="-j$(nproc)" "$PYTHON" -m pip wheel --quiet --disable-pip-version-check \
        --no-build-isolation --no-deps -w "$work/dist" .
    if [[ ${HOROVOD_CUDA_HOME:-} == "$work/cuda" ]]; then
        point_runpath_at_nccl_wheel "$work"/dist/horovod-*.whl
    fi
    mkdir -p "$wheel_dir"
    mv "$work"/dist/horovod-*.whl "$wheel_dir/"
    cd - > /dev/null
fi

# With its small runtime dependencies (cloudpickle, psutil, pyyaml, packaging, cffi).
"$PYTHON" -m pip install --quiet --disable-pip-version-check "$wheel_dir"/horovod-*.whl
