"""Build information of the compiled module and `python -m megalith.kernels`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata

import megalith.kernels as kernels


def _toolkit_present() -> bool:
    return shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")


def test_build_info_describes_this_build():
    info = kernels.build_info()
    assert info["version"] == metadata.version("megalith-kernels") == kernels.__version__
    assert info["build_type"] == "Release"
    assert info["cxx_standard"] == 17
    assert info["compiler"].split()[0] in {"GNU", "Clang", "AppleClang", "IntelLLVM"}
    mode = os.environ.get("MEGALITH_CUDA", "AUTO").upper()
    if mode == "ON" or (mode == "AUTO" and _toolkit_present()):
        assert info["cuda"] is True
        assert {"80", "90a"} <= set(info["cuda_archs"])
        assert info["cuda_runtime"] and info["cuda_compiler"].startswith("NVIDIA")
    if mode == "OFF":
        assert info["cuda"] is False and info["cuda_archs"] == []


def test_cuda_availability_is_consistent():
    available = kernels.cuda_available()
    reason = kernels.cuda_unavailable_reason()
    assert isinstance(available, bool)
    assert (reason is None) == available
    if not kernels.build_info()["cuda"]:
        assert not available and "without CUDA" in reason


def test_module_main_prints_build_and_availability():
    out = subprocess.run([sys.executable, "-m", "megalith.kernels"], check=True, capture_output=True, text=True).stdout
    info = kernels.build_info()
    assert f"megalith-kernels {info['version']}" in out
    if info["cuda"]:
        assert "CUDA compiled in: yes" in out
        for arch in info["cuda_archs"]:
            assert f"sm_{arch}" in out
    else:
        assert "CUDA compiled in: no" in out
    assert ("CUDA available now: yes" in out) == kernels.cuda_available()
    assert f"CPU kernels: {kernels._C.kernels.cpu_isa()} instruction set" in out


def test_compiled_module_needs_no_torch():
    code = (
        "import sys, numpy as np, megalith.kernels as k; k.build_info(); k.cuda_available();"
        "from megalith.kernels import _C; _C.data.build_blending_index(np.array([1.0]), 3);"
        "assert 'torch' not in sys.modules, 'importing megalith.kernels pulled in torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
