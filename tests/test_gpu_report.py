"""benchmarks/gpu_report.py without a GPU: the plan and output format (--dry-run), a failing section, a section
stopped at its limit, the time budget, the per-test and per-file limits of the test runner, and the carried-wheel
check. What the sections measure on a GPU is checked only there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_report.py"
SECTIONS = ["environment", "build", "tests", "kernels", "attention", "comm", "fp8", "training", "training-compiled",
            "moe", "context"]  # fmt: skip


def _report(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)  # fmt: skip
    report = json.loads((tmp_path / "gpu-report.json").read_text())
    return proc, report, (tmp_path / "gpu-report.md").read_text()


def test_dry_run_plans_every_section_and_writes_both_files(tmp_path):
    proc, report, markdown = _report(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("plan (420 s budget): environment <= 60 s, build <= 240 s, tests <= 150 s")
    assert list(report["sections"]) == SECTIONS
    assert {r["status"] for r in report["sections"].values()} == {"planned"}
    assert report["dry_run"] is True and report["budget_s"] == 420.0
    assert report["sections"]["kernels"]["notes"][0].startswith(
        "plan: The copy and matmul ceilings, then each fused op"
    )
    lines = markdown.splitlines()
    assert lines[0] == "# Megalith GPU report (dry run)"
    table = lines[lines.index("| section | status | seconds | note |") + 2 :][: len(SECTIONS)]
    assert [row.split(" | ")[0].lstrip("| ") for row in table] == SECTIONS
    assert all(row.count(" | ") == 3 and row.endswith(" |") for row in table)
    assert proc.stdout.rstrip().endswith(lines[-1])  # the markdown is also printed last
    assert (tmp_path / "gpu-report.log").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what the sections do without a GPU")
def test_failed_timed_out_and_skipped_sections_are_recorded(tmp_path):
    proc, report, markdown = _report(
        tmp_path,
        "--sections",
        "environment",
        "kernels",
        "attention",
        "--limit",
        "environment=0.2",
        "--limit",
        "kernels=20",
        "--budget",
        "40",
    )
    assert proc.returncode == 1
    sections = report["sections"]
    assert sections["environment"]["status"] == "timed out"  # importing torch alone takes longer
    assert sections["environment"]["error"] == "stopped at its 0.2 s limit (what it measured is kept)"
    assert sections["kernels"] == {**sections["kernels"], "status": "failed",
                                   "error": "RuntimeError: needs a CUDA GPU, and torch sees none"}  # fmt: skip
    assert sections["attention"]["status"] == "skipped"
    assert sections["attention"]["error"].endswith("the section needs 30 s")
    assert "| kernels | failed |" in markdown and "| attention | skipped |" in markdown
    log = (tmp_path / "gpu-report.log").read_text()
    assert "===== environment (limit 0.2 s) =====" in log and "===== kernels (limit 20 s) =====" in log
    assert "Traceback" in log  # the failure's traceback is in the log, the report keeps one line


def test_run_test_file_limits_each_test_and_each_file(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_sections

    test_file = tmp_path / "test_sample.py"
    test_file.write_text(
        "import time\n\n"
        "def test_passes():\n    pass\n\n"
        "def test_fails():\n    assert 1 == 2, 'one is not two'\n\n"
        "def test_hangs():\n    time.sleep(60)\n"
    )
    plugin = ["-p", "tests.conftest"]  # the --test-timeout option lives there
    counts, failures = gpu_sections.run_test_file(str(test_file), limit=120, test_timeout=2, args=plugin)
    assert counts == {"passed": 1, "failed": 2, "error": 0, "skipped": 0}
    messages = dict(failures)
    assert len(messages) == 2
    assert next(m for t, m in messages.items() if t.endswith("::test_fails")).startswith("AssertionError: one is")
    hang = next(m for t, m in messages.items() if t.endswith("::test_hangs"))
    assert "TimeLimitExceeded" in hang and "ran past --test-timeout 2 s" in hang
    counts, failures = gpu_sections.run_test_file(str(test_file), limit=4, test_timeout=100, args=plugin)
    assert counts == {"error": 1}
    assert failures == [(str(test_file), "the file ran past its 4 s limit and was stopped")]


def test_build_refuses_missing_or_stale_carried_wheels(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_sections

    monkeypatch.setattr(gpu_sections, "CARRY", tmp_path)
    record = gpu_sections.Record(None)
    with pytest.raises(RuntimeError, match=r"no carried wheels in \.gpu-carry: run `make gpu-carry` here"):
        gpu_sections.section_build(record, None)
    for name in ("data", "core", "training", "export"):
        (tmp_path / f"megalith_{name}-0.1.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "digest").write_text("0" * 64 + "\n")
    with pytest.raises(RuntimeError, match="built from other sources than packages/: run make gpu-carry"):
        gpu_sections.section_build(record, None)
    if not torch.cuda.is_available():
        (tmp_path / "digest").write_text(gpu_sections.source_digest() + "\n")
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):  # the wheels pass; the GPU check comes next
            gpu_sections.section_build(record, None)


def test_the_kernels_section_writes_an_auto_table_with_the_gpu_rows_merged_in(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_sections

    from megalith.kernels import auto_choice

    rows = [{"op": "rms_norm", "fused_fwd_ms": 0.1, "fused_ms": 0.3, "torch_fwd_ms": 0.2, "torch_ms": 0.6,
             "choice": "fused"},
            {"op": "attention", "fused_fwd_ms": 2.0, "fused_ms": 6.0, "torch_fwd_ms": 1.0, "torch_ms": 3.0,
             "choice": "torch"}]  # fmt: skip
    conditions = {"device": "NVIDIA H200", "clock": "wall", "repeats": 10}
    table = gpu_sections.write_cuda_auto_table(tmp_path / "out", {"bfloat16": rows}, conditions)
    assert auto_choice("rms_norm", "cuda", torch.bfloat16, table=table) == "fused"
    assert auto_choice("attention", "cuda", torch.bfloat16, table=table) == "torch"
    # The packaged CPU rows are kept; the packaged file itself is untouched.
    for op in ("rms_norm", "attention", "layer_norm"):
        assert auto_choice(op, "cpu", torch.float32, table=table) == auto_choice(op, "cpu", torch.float32)
    assert json.loads(table.read_text())["conditions"]["cuda"] == conditions
    assert auto_choice("rms_norm", "cuda", torch.bfloat16) == "torch"


@pytest.mark.slow
def test_prepare_carry_builds_the_four_wheels_with_their_digest(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_sections

    monkeypatch.setattr(gpu_sections, "CARRY", tmp_path / "carry")
    gpu_sections.prepare_carry()
    names = sorted(p.name.split("-")[0] for p in (tmp_path / "carry").glob("*.whl"))
    assert names == ["megalith_core", "megalith_data", "megalith_export", "megalith_training"]
    assert (tmp_path / "carry" / "digest").read_text().strip() == gpu_sections.source_digest()
    assert (tmp_path / "carry" / "commit").read_text().strip()  # read on a machine that has no .git
