"""Which GPU architectures to compile Horovod's CUDA kernels for: those the installed torch/TensorFlow
were built for, as far as this nvcc supports them. An architecture nvcc dropped is replaced by the lowest
supported one of the same major, whose code runs on it (TensorFlow's sm_70 by sm_75); one with no
supported sibling (sm_60 under CUDA 13) is left out.

    python cuda_architectures.py 75,80,86,87,88,89,90,100,103,110,120,121   # nvcc --list-gpu-arch
    75,80,89,90                          # with TensorFlow 2.21: sm_60,sm_70,sm_80,sm_89,compute_90
"""

import importlib.util
import re
import sys


def framework_architectures() -> list[str]:
    names = []
    if importlib.util.find_spec("torch"):
        import torch

        names += torch.cuda.get_arch_list()
    if importlib.util.find_spec("tensorflow"):
        import tensorflow as tf

        names += tf.sysconfig.get_build_info().get("cuda_compute_capabilities", [])
    return names


def choose(wanted: list[str], supported: list[int]) -> list[int]:
    """`wanted` as the frameworks name them (sm_80, compute_90). All supported ones (Horovod's own default)
    when nothing is wanted, e.g. CPU builds, or none of it can be built."""
    supported = sorted(supported)
    chosen = set()
    for capability in {int(re.sub(r"\D", "", name)) for name in wanted}:
        same_major = [cc for cc in supported if cc >= capability and cc // 10 == capability // 10]
        chosen.update(same_major[:1])
    return sorted(chosen) or supported


if __name__ == "__main__":
    nvcc_supported = [int(cc) for cc in sys.argv[1].split(",") if cc]
    print(",".join(map(str, choose(framework_architectures(), nvcc_supported))))
