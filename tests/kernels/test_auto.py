"""kernels="auto": the committed measurement table, `auto_choice`, and the benchmark that writes the table."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megalith.kernels import auto_choice
from megalith.kernels._auto import AUTO_TABLE, OPS

REPO = Path(__file__).resolve().parents[2]


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("kernels_benchmark", REPO / "benchmarks" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_committed_table_covers_every_op_on_cpu_and_agrees_with_its_times():
    table = json.loads(AUTO_TABLE.read_text())
    for dtype in ("float32", "bfloat16"):
        entries = table["entries"]["cpu"][dtype]
        assert set(entries) == set(OPS), f"cpu {dtype}: the table misses {set(OPS) - set(entries)}"
        for op, entry in entries.items():
            faster = "fused" if entry["fused_ms"] <= entry["torch_ms"] else "torch"
            assert entry["choice"] == faster, f"cpu {dtype} {op}: choice {entry['choice']} but times say {faster}"
            assert auto_choice(op, "cpu", getattr(torch, dtype)) == entry["choice"]
    assert set(table["conditions"]["cpu"]) >= {"device", "shape", "torch", "threads", "repeats"}


def test_auto_choice_accepts_devices_and_dtype_names_and_defaults_to_torch(tmp_path):
    path = tmp_path / "table.json"
    entry = {"choice": "fused", "fused_ms": 1.0, "torch_ms": 2.0}
    path.write_text(json.dumps({"format": 1, "entries": {"cpu": {"float32": {"swiglu": entry}}}}))
    assert auto_choice("swiglu", "cpu", torch.float32, table=path) == "fused"
    assert auto_choice("swiglu", torch.device("cpu"), "float32", table=path) == "fused"
    assert auto_choice("swiglu", "cpu", torch.bfloat16, table=path) == "torch"  # never measured
    assert auto_choice("swiglu", "cuda", torch.float32, table=path) == "torch"
    assert auto_choice("rms_norm", "cpu", torch.float32, table=path) == "torch"
    assert auto_choice("rms_norm", "cpu", torch.float32, table=tmp_path / "missing.json") == "torch"
    with pytest.raises(ValueError, match="unknown op 'gelu'; the fused kernels are attention, bias_gelu"):
        auto_choice("gelu", "cpu", torch.float32)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"format": 2, "entries": {}}), "format 1, got format 2"),
        (json.dumps({"format": 1, "entries": {"cpu": {"float32": {"swiglu": {"choice": "fast"}}}}}),
         r"entries\.cpu\.float32\.swiglu\.choice must be 'fused' or 'torch', got 'fast'"),
        (json.dumps({"format": 1, "entries": {"cpu": {"float32": {"softmax": {"choice": "torch"}}}}}),
         r"entries\.cpu\.float32\.softmax names an unknown op"),
        (json.dumps({"format": 1, "entries": {"cpu": ["float32"]}}), r"entries\.cpu must map dtypes to ops"),
    ],
)  # fmt: skip
def test_a_broken_table_is_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        auto_choice("swiglu", "cpu", torch.float32, table=path)
    assert str(path) in str(info.value)


def test_benchmark_writes_a_table_auto_choice_reads_and_keeps_other_devices(tmp_path):
    bench = _benchmark_module()
    path = tmp_path / "auto_table.json"
    cuda_rows = [{"op": "attention", "fused_ms": 1.0, "torch_ms": 0.5, "fused_fwd_ms": 0.4, "torch_fwd_ms": 0.2,
                  "choice": "torch"}]  # fmt: skip
    bench.write_auto_table(path, {"cuda": {"bfloat16": cuda_rows}}, {"cuda": {"device": "a GPU"}})
    shape = bench.Shape(1, 8, 16, 2, 1, 8, 12, 50)
    rows = bench.measure(shape, "cpu", torch.float32, 1, {"swiglu", "rms_norm"})
    bench.write_auto_table(path, {"cpu": {"float32": rows}}, {"cpu": {"device": "this cpu"}})
    rows += bench.measure(shape, "cpu", torch.float32, 1, {"rope"})[:1]  # a later run of one op keeps the others
    bench.write_auto_table(path, {"cpu": {"float32": rows[-1:]}}, {"cpu": {"device": "this cpu"}})
    assert set(json.loads(path.read_text())["entries"]["cpu"]["float32"]) == {"swiglu", "rms_norm", "rope"}
    for row in rows:
        assert auto_choice(row["op"], "cpu", torch.float32, table=path) == row["choice"]
    assert auto_choice("attention", "cuda", torch.bfloat16, table=path) == "torch"
    assert json.loads(path.read_text())["conditions"]["cuda"] == {"device": "a GPU"}
    assert not list(tmp_path.glob("*.tmp")), "the temporary file was left behind"


def test_reading_the_table_needs_no_torch():
    code = (
        "import sys; from megalith.kernels import auto_choice; auto_choice('rope', 'cpu', 'float32');"
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
