"""megalith.kernels.nccl on a CPU: the library search order, version checks, errors and unique ids against the
real libnccl of the nvidia-nccl-cu12 wheel (a dev requirement), and the communicator's argument checks."""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest

import megalith.kernels as kernels
from megalith.kernels import _C, nccl

_N = _C.nccl


def _wheels() -> dict[str, tuple[str, str]]:
    """{name: (version, path of libnccl.so.2)} of the installed nvidia-nccl wheels, read from their metadata."""
    found = {}
    for name in ("nvidia-nccl-cu12", "nvidia-nccl-cu13"):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found[name] = (dist.version, str(dist.locate_file("nvidia/nccl/lib/libnccl.so.2")))
    if not found:
        pytest.fail("nvidia-nccl-cu12 is not installed; it is in requirements/dev.txt (run `make setup`)")
    return found


def _wheel() -> tuple[str, str]:
    """(version, path) of the wheel whose libnccl.so.2 is on disk. A CUDA 13 torch installs nvidia-nccl-cu13
    beside the -cu12 of the dev requirements, and both write the same file: the one whose version the file
    reports (ncclGetVersion, read in a fresh process) is its owner."""
    wheels = _wheels()
    if len(wheels) == 1:
        return next(iter(wheels.values()))
    info = _info_in_subprocess("from megalith.kernels import _C, nccl; nccl.version(); info = _C.nccl.library_info()")
    owners = [w for w in wheels.values() if _numbers(w[0]) == list(info["version"])]
    assert owners, f"libnccl.so.2 reports {info['version']}, which none of the installed wheels {wheels} is"
    return owners[0]


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter (NCCL loads once per process) with the given environment changes."""
    full_env = {k: v for k, v in os.environ.items() if k != nccl.LIBRARY_ENV}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=120
    )


def _info_in_subprocess(code: str, **env: str) -> dict:
    result = _run(code + "\nimport json; print(json.dumps(info))", **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _numbers(version: str) -> list[int]:
    return [int(part) for part in re.findall(r"\d+", version)[:3]]


@pytest.fixture
def linked_library(tmp_path):
    """A directory with a libnccl.so.2 symlink to the wheel's library, to load it from elsewhere."""
    _, path = _wheel()
    (tmp_path / "libnccl.so.2").symlink_to(path)
    return tmp_path


# ---- search order ----------------------------------------------------------------------------------------


def test_loads_the_installed_wheel_and_reports_its_version():
    wheels = _wheels()
    info = _info_in_subprocess("from megalith.kernels import nccl; info = nccl.library_info()")
    assert info["source"] == "wheel"
    assert info["wheel"] in wheels
    version, path = wheels[info["wheel"]]  # the wheel named is the one whose version the file reports
    assert os.path.realpath(info["path"]) == os.path.realpath(path)
    assert info["version"] == _numbers(version)  # ncclGetVersion agrees with the wheel's own version
    assert list(nccl.version()) == _numbers(version) and nccl.library_path() == info["path"]


@pytest.mark.parametrize("as_directory", [False, True])
def test_megalith_nccl_library_comes_first(linked_library, as_directory):
    target = linked_library if as_directory else linked_library / "libnccl.so.2"
    info = _info_in_subprocess(
        "from megalith.kernels import nccl; info = nccl.library_info()", MEGALITH_NCCL_LIBRARY=str(target)
    )
    assert info["source"] == "MEGALITH_NCCL_LIBRARY"
    assert info["path"] == str(linked_library / "libnccl.so.2")  # not the wheel's path, although it is installed


def test_system_library_path_is_searched_last(linked_library):
    info = _info_in_subprocess(
        "from megalith.kernels import _C; info = _C.nccl.load('', [])", LD_LIBRARY_PATH=str(linked_library)
    )
    assert info["source"] == "system" and info["path"] == str(linked_library / "libnccl.so.2")


def test_wheel_directories_are_tried_in_order_before_the_system_path(linked_library, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    info = _info_in_subprocess(
        f"from megalith.kernels import _C; info = _C.nccl.load('', [{str(empty)!r}, {str(linked_library)!r}])"
    )
    assert info["source"] == "wheel" and info["path"] == str(linked_library / "libnccl.so.2")


def test_an_explicit_path_that_does_not_load_is_an_error_not_a_fallback(tmp_path):
    missing = tmp_path / "nowhere" / "libnccl.so.2"
    result = _run("from megalith.kernels import nccl; nccl.version()", MEGALITH_NCCL_LIBRARY=str(missing))
    assert result.returncode != 0
    assert f"NcclLibraryError: MEGALITH_NCCL_LIBRARY={missing} cannot be loaded" in result.stderr


def test_a_library_that_is_not_nccl_is_refused():
    result = _run("from megalith.kernels import nccl; nccl.version()", MEGALITH_NCCL_LIBRARY=_C.__file__)
    assert result.returncode != 0
    assert "has no ncclGetVersion; it is not an NCCL library" in result.stderr


@pytest.mark.skipif(ctypes.util.find_library("nccl") is not None, reason="this machine has a system libnccl")
def test_missing_library_names_the_variable_and_the_extra():
    code = """
        from megalith.kernels import nccl
        nccl._wheel_dirs = lambda: []  # as if no nvidia-nccl wheel were installed
        nccl.unique_id()
    """
    result = _run(code, LD_LIBRARY_PATH="")
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("megalith.kernels._C.nccl.NcclLibraryError: NCCL library not found.")
    assert "MEGALITH_NCCL_LIBRARY (not set)" in message and "nvidia-nccl-cu12/-cu13 wheel (not installed)" in message
    assert "pip install 'megalith-kernels[nccl]'" in message and "megalith-kernels[nccl-cu13]" in message


def test_a_broken_wheel_directory_is_named_in_the_error(tmp_path):
    if ctypes.util.find_library("nccl") is not None:
        pytest.skip("this machine has a system libnccl")
    result = _run(f"from megalith.kernels import _C; _C.nccl.load('', [{str(tmp_path)!r}])", LD_LIBRARY_PATH="")
    assert f"the wheel's {tmp_path}/libnccl.so.2 (" in result.stderr


# ---- versions ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [(2708, (2, 7, 8)), (2804, (2, 8, 4)), (20906, (2, 9, 6)), (21801, (2, 18, 1)), (23203, (2, 32, 3))],
)
def test_version_codes_decode_in_both_encodings(code, expected):
    assert _N.parse_version(code) == expected


@pytest.mark.parametrize("code", [2804, 2999, 21704, 21800])
def test_versions_below_the_minimum_are_refused(code):
    found = ".".join(map(str, _N.parse_version(code)))
    with pytest.raises(nccl.NcclLibraryError, match=rf"NCCL {re.escape(found)} at /opt/x.so is older than the mini"):
        _N.check_version(code, "/opt/x.so")


@pytest.mark.parametrize("code", [21801, 21900, 23203, 30000])
def test_versions_from_the_minimum_on_are_accepted(code):
    _N.check_version(code, "/opt/x.so")


def test_minimum_version_is_documented_value():
    assert nccl.MIN_VERSION == (2, 18, 1)
    with pytest.raises(nccl.NcclLibraryError, match="invalid NCCL version code 0"):
        _N.parse_version(0)


# ---- the real library without a GPU ---------------------------------------------------------------------------


def test_unique_ids_are_fresh_128_byte_values():
    first, second = nccl.unique_id(), nccl.unique_id()
    assert len(first) == len(second) == nccl.UNIQUE_ID_BYTES
    assert first != second and any(first)


def test_error_strings_come_from_the_library():
    nccl.library_info()
    assert "invalid argument" in _N.error_string(4)
    assert "unhandled cuda error" in _N.error_string(1)


def test_exception_hierarchy():
    assert issubclass(nccl.NcclTimeoutError, nccl.NcclError) and issubclass(nccl.NcclTimeoutError, TimeoutError)
    assert issubclass(nccl.NcclError, RuntimeError) and issubclass(nccl.NcclLibraryError, RuntimeError)


def test_module_main_reports_the_library():
    version, _ = _wheel()
    out = subprocess.run([sys.executable, "-m", "megalith.kernels"], capture_output=True, text=True, check=True)
    expected_version = ".".join(map(str, _numbers(version)))
    assert f"NCCL library: {expected_version} at {nccl.library_path()} (from the nvidia-nccl-cu" in out.stdout
    assert "minimum 2.18.1" in out.stdout
    compiled = "yes" if kernels.build_info()["cuda"] else "no (CPU-only build)"
    assert f"NCCL communicator compiled in: {compiled}" in out.stdout


def test_module_main_reports_a_missing_library(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != nccl.LIBRARY_ENV}
    env[nccl.LIBRARY_ENV] = str(tmp_path / "libnccl.so.2")
    out = subprocess.run([sys.executable, "-m", "megalith.kernels"], capture_output=True, text=True, env=env)
    assert out.returncode == 0
    assert f"NCCL library: not found (MEGALITH_NCCL_LIBRARY={tmp_path}/libnccl.so.2 cannot be loaded" in out.stdout


def test_importing_nccl_needs_no_torch():
    code = "import sys; from megalith.kernels import nccl; nccl.unique_id(); assert 'torch' not in sys.modules"
    result = _run(code)
    assert result.returncode == 0, result.stderr


# ---- the communicator's construction checks -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"unique_id": b"x" * 12}, "unique_id must be the 128 bytes of nccl.unique_id(), got 12 bytes"),
        ({"unique_id": "text"}, "unique_id must be the 128 bytes of nccl.unique_id(), got str"),
        ({"size": 0}, "size must be a positive int, got 0"),
        ({"rank": 2}, "rank must be an int in [0, 2), got 2"),
        ({"rank": -1}, "rank must be an int in [0, 2), got -1"),
        ({"device": -1}, "device must be a CUDA device index >= 0, got -1"),
        ({"timeout": 0}, "timeout must be a positive number of seconds, got 0"),
        ({"timeout": float("nan")}, "timeout must be a positive number of seconds, got nan"),
    ],
)
def test_communicator_arguments_are_checked(kwargs, message):
    args = {"unique_id": bytes(128), "rank": 0, "size": 2, "device": 0, "timeout": 5.0} | kwargs
    timeout = args.pop("timeout")
    with pytest.raises(ValueError, match=re.escape(message)):
        nccl.Communicator(**args, timeout=timeout)


@pytest.mark.skipif(kernels.cuda_available(), reason="checks the error on a machine without a GPU")
def test_communicator_without_a_gpu_raises_a_clear_error():
    if kernels.build_info()["cuda"]:
        with pytest.raises(RuntimeError, match=r"NCCL communicator \(rank 0 of 1, cuda:0\) needs a CUDA GPU, but"):
            nccl.Communicator(nccl.unique_id(), 0, 1, 0, timeout=5)
    else:
        with pytest.raises(RuntimeError, match="megalith-kernels was built without CUDA"):
            nccl.Communicator(nccl.unique_id(), 0, 1, 0, timeout=5)


def test_nccl_extras_name_a_wheel_per_cuda_major_at_the_minimum_version():
    requires = metadata.requires("megalith-kernels") or []
    by_extra: dict[str, list[str]] = {}
    for line in requires:
        match = re.fullmatch(r"""(.+?)\s*;\s*extra\s*==\s*["']([\w-]+)["']""", line)
        if match:
            by_extra.setdefault(match.group(2), []).append(match.group(1).replace(" ", ""))
    minimum = ".".join(map(str, nccl.MIN_VERSION))
    assert by_extra["nccl"] == by_extra["nccl-cu12"] == [f"nvidia-nccl-cu12>={minimum}"]
    assert len(by_extra["nccl-cu13"]) == 1 and by_extra["nccl-cu13"][0].startswith("nvidia-nccl-cu13>=")
