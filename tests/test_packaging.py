"""Install paths a user takes: a wheel of each distribution, megalith-data alone, a torch-free compiled module.

These build real wheels (reusing the compiled module's build directory, so it is incremental) and one fresh
virtual environment, so they are marked slow.
"""

from __future__ import annotations

import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["core", "data", "training", "export"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    sources = [str(ROOT)] + [str(ROOT / "packages" / name) for name in PACKAGES]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), *sources],
        check=True,
        cwd=ROOT,
    )
    found = {}
    for name in ["kernels", *PACKAGES]:
        matches = sorted(out.glob(f"megalith_{name}-0.1.0-*.whl"))
        assert len(matches) == 1, f"expected one megalith-{name} wheel in {sorted(p.name for p in out.iterdir())}"
        found[name] = matches[0]
    return found


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def _metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return archive.read(name).decode()


def test_every_distribution_builds_a_wheel_in_the_shared_namespace(wheels):
    for name, wheel in wheels.items():
        names = _names(wheel)
        assert "megalith/__init__.py" not in names, f"{wheel.name} breaks the PEP 420 namespace"
        assert f"megalith/{name}/__init__.py" in names, f"{wheel.name} lacks megalith/{name}"
        assert all(n.startswith(("megalith/", "megalith_")) for n in names), f"{wheel.name} installs stray files"
    assert any(n.startswith("megalith/kernels/_C") and n.endswith(".so") for n in _names(wheels["kernels"]))


def test_siblings_are_required_as_version_ranges(wheels):
    expected = {
        "core": ["megalith-kernels[torch]<0.2,>=0.1"],
        "data": ["megalith-kernels<0.2,>=0.1"],
        "training": ["megalith-core<0.2,>=0.1", "megalith-data<0.2,>=0.1"],
        "export": ["megalith-core<0.2,>=0.1"],
    }
    for name, requirements in expected.items():
        lines = [
            line.split(":", 1)[1].strip().replace(" ", "")
            for line in _metadata(wheels[name]).splitlines()
            if line.startswith("Requires-Dist:")
        ]
        for requirement in requirements:
            assert requirement in lines, f"megalith-{name} should require {requirement}, has {lines}"


def _imports_torch(folder: Path) -> bool:
    pattern = re.compile(r"^\s*(import torch\b|from torch\b)", re.MULTILINE)
    return any(pattern.search(path.read_text()) for path in folder.rglob("*.py"))


def test_every_distribution_that_imports_torch_requires_the_tested_range(wheels):
    """The range is written in each pyproject.toml; all must match the root's `torch` extra, floor and ceiling."""
    sources = {"kernels": ROOT / "python", **{name: ROOT / "packages" / name / "src" for name in PACKAGES}}
    ranges = {}
    for name, wheel in wheels.items():
        requirements = [
            Requirement(line.split(":", 1)[1])
            for line in _metadata(wheel).splitlines()
            if line.startswith("Requires-Dist:")
        ]
        torch_specs = {str(r.specifier) for r in requirements if r.name == "torch"}
        assert bool(torch_specs) == _imports_torch(sources[name]), f"megalith-{name} imports torch: {torch_specs}"
        if torch_specs:
            assert len(torch_specs) == 1, f"megalith-{name} requires torch twice: {torch_specs}"
            ranges[name] = SpecifierSet(torch_specs.pop())
    assert "data" not in ranges, "megalith-data never imports torch"
    assert len({str(r) for r in ranges.values()}) == 1, f"the torch ranges differ: {ranges}"
    operators = sorted(spec.operator for spec in ranges["kernels"])
    assert operators == ["<=", ">="], f"the range needs a floor and a ceiling (CI tests both): {ranges['kernels']}"


def test_compiled_module_does_not_link_libtorch(wheels, tmp_path):
    with zipfile.ZipFile(wheels["kernels"]) as archive:
        member = next(n for n in archive.namelist() if n.startswith("megalith/kernels/_C") and n.endswith(".so"))
        library = Path(archive.extract(member, tmp_path))
    dynamic = subprocess.run(["readelf", "-d", str(library)], check=True, capture_output=True, text=True).stdout
    needed = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert needed, "readelf found no dynamic dependencies at all; is this the right file?"
    forbidden = [lib for lib in needed if lib.startswith(("libtorch", "libc10", "libcudart", "libpython"))]
    assert not forbidden, f"{member} must not depend on {forbidden} (needs {needed})"


def test_data_package_installs_and_works_alone(wheels, tmp_path):
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            str(wheels["kernels"]),
            str(wheels["data"]),
        ],
        check=True,
    )
    script = (
        "import sys, importlib.util\n"
        "import megalith.data as data\n"
        "index = data.build_sample_index([5, 3, 7, 2], [2, 0, 3, 1], 4, 1, 17)\n"
        "assert index.tolist() == [[0, 0], [0, 4], [1, 1], [2, 0], [3, 2]], index\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('megalith.'))\n"
        "upper = ('megalith.core', 'megalith.training', 'megalith.export')\n"
        "assert not any(m.startswith(upper) for m in loaded), loaded\n"
        "assert 'torch' not in sys.modules\n"
        "assert importlib.util.find_spec('torch') is None, 'torch leaked into the fresh environment'\n"
        "print('ok', loaded)\n"
    )
    out = subprocess.run([str(python), "-c", script], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.startswith("ok")
