import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "cuda_architectures.py"
spec = importlib.util.spec_from_file_location("cuda_architectures", SCRIPT)
cuda_architectures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cuda_architectures)
choose = cuda_architectures.choose

CUDA_13 = [75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121]


def test_torch_architectures_are_kept_as_built():
    wanted = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    assert choose(wanted, CUDA_13) == [75, 80, 86, 90, 100, 120]


def test_dropped_architecture_is_replaced_by_its_lowest_supported_sibling():
    # TensorFlow 2.21's list under CUDA 13: sm_70 code is compiled as sm_75, Pascal has no sibling.
    wanted = ["sm_60", "sm_70", "sm_80", "sm_89", "compute_90"]
    assert choose(wanted, CUDA_13) == [75, 80, 89, 90]


def test_both_frameworks_are_united_without_duplicates():
    assert choose(["sm_80", "sm_90", "sm_80", "compute_90"], CUDA_13) == [80, 90]


def test_no_framework_architectures_means_all_supported():
    assert choose([], [90, 75, 80]) == [75, 80, 90]


def test_nothing_buildable_falls_back_to_all_supported_not_to_an_empty_list():
    # An empty HOROVOD_BUILD_CUDA_CC_LIST would crash Horovod's build (int('')).
    assert choose(["sm_60", "sm_61"], CUDA_13) == CUDA_13


def test_command_line_prints_the_choice_for_nvccs_list():
    # -S: no site-packages, so no framework to ask (importing torch and TensorFlow takes ~10 s); the
    # framework probes run for real in the image builds (docker/Dockerfile, DEVICE=gpu).
    result = subprocess.run(
        [sys.executable, "-S", str(SCRIPT), "90,75,80"], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "75,80,90"
