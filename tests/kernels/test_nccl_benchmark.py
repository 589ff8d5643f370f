"""benchmarks/comm.py --dry-run: the plan it prints without a GPU (the measurement itself needs one)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "comm.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_dry_run_prints_every_size_and_method_without_a_gpu():
    result = _run("--dry-run", "--dtype", "float32", "--iters", "7", "--repeats", "3", "--warmup", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "in-place all-reduce of float32, world size 1" in out
    assert "methods: torch, megalith, graph" in out
    assert "latency (us) at: 1 KiB, 4 KiB, 16 KiB, 64 KiB, 256 KiB, 1 MiB" in out
    assert "bus bandwidth (GB/s) at: 16 MiB, 64 MiB, 256 MiB" in out
    assert "median of 3 loops of 7 calls after 2 warm-up calls" in out
    assert "no GPU was used" in out


def test_bad_counts_are_rejected():
    result = _run("--dry-run", "--iters", "0")
    assert result.returncode == 2 and "--iters must be >= 1, got 0" in result.stderr
