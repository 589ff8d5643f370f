"""runtime.kernels="auto": each op of the model runs the implementation the measured table names for the call's
device type and dtype, and a build without the fused ops runs torch everywhere."""

from __future__ import annotations

import builtins
import json

import pytest
import torch

import megalith.kernels._auto as auto_module
from megalith.core import RuntimeConfig, build_loss_fn, build_model_chunks, get_preset
from megalith.core.models.ops import AutoOps, FusedOps, TorchOps, auto_kernel, get_ops
from megalith.kernels import auto_choice
from megalith.kernels._auto import OPS

MODEL_OPS = {"attention": "attention", "rms_norm": "rms_norm", "layer_norm": "layer_norm", "rope": "rope",
             "swiglu": "swiglu", "gelu": "bias_gelu", "cross_entropy": "cross_entropy"}  # fmt: skip


def _table(path, choice_of):
    """An auto table at `path` giving `choice_of(op)` for every op on the CPU in float32 and bfloat16."""
    entries = {dtype: {op: {"choice": choice_of(op), "fused_ms": 1.0, "torch_ms": 1.0} for op in OPS}
               for dtype in ("float32", "bfloat16")}  # fmt: skip
    path.write_text(json.dumps({"format": 1, "entries": {"cpu": entries}, "conditions": {}}))
    return path


@pytest.fixture
def table(tmp_path, monkeypatch):
    """Points the packaged table at a temporary file the test writes (the loader's cache cleared around it)."""

    def use(choice_of):
        path = _table(tmp_path / "auto_table.json", choice_of)
        monkeypatch.setattr(auto_module, "AUTO_TABLE", path)
        auto_module._load.cache_clear()

    yield use
    auto_module._load.cache_clear()


def test_auto_is_the_default_op_set():
    assert RuntimeConfig().kernels == "auto"
    assert isinstance(get_ops("auto"), AutoOps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_op_follows_the_packaged_table(dtype):
    ops = AutoOps()
    for op, kernel in MODEL_OPS.items():
        want = FusedOps if auto_choice(kernel, "cpu", dtype) == "fused" else TorchOps
        assert isinstance(ops.choice(op, "cpu", dtype), want), f"{op} on cpu {dtype}"
        # a device type the table never measured runs torch
        assert isinstance(ops.choice(op, "xpu", dtype), TorchOps)


def test_the_table_decides_per_op(table):
    table(lambda op: "fused" if op in ("rms_norm", "cross_entropy") else "torch")
    ops = AutoOps()
    chosen = {op: ops.choice(op, "cpu", torch.float32).name for op in MODEL_OPS}
    assert chosen == {op: "fused" if op in ("rms_norm", "cross_entropy") else "torch" for op in MODEL_OPS}


def _logits_and_grads(kernels: str):
    config = get_preset("tiny")
    (model,) = build_model_chunks(config, runtime=RuntimeConfig(kernels=kernels), seed=3)
    loss_fn = build_loss_fn(model, kernels=kernels)
    ids = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    logits = model(ids)
    loss_fn(logits, ids).mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("choice", ["torch", "fused"])
def test_a_table_of_one_choice_gives_exactly_that_op_set(table, choice):
    table(lambda op: choice)
    logits, grads = _logits_and_grads("auto")
    want_logits, want_grads = _logits_and_grads(choice)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=0, atol=0, msg=name)


def test_a_build_without_fused_ops_runs_torch_everywhere(monkeypatch):
    real_import = builtins.__import__

    def no_kernel_ops(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "megalith.kernels" and fromlist and "ops" in fromlist:
            raise ImportError("megalith.kernels.ops: this build has no fused ops")
        if name == "megalith.kernels.ops":
            raise ImportError("megalith.kernels.ops: this build has no fused ops")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_kernel_ops)
    assert auto_kernel("rms_norm", "cpu", torch.float32) == "torch"
    ops = AutoOps()
    assert all(isinstance(ops.choice(op, "cpu", torch.float32), TorchOps) for op in MODEL_OPS)


def test_calls_read_no_table_once_the_set_is_made(table, monkeypatch):
    """torch.compile traces the calls and cannot read a file: every usual (op, device, dtype) is resolved when the
    set is made, so a call on the CPU in float32 or bfloat16 never goes back to the table."""
    table(lambda op: "fused" if op in ("rms_norm", "swiglu") else "torch")
    ops = AutoOps()

    def no_reading(*args, **kwargs):
        raise AssertionError("the auto table was read during a call")

    no_reading.cache_clear = lambda: None  # the fixture clears the loader's cache when it ends
    monkeypatch.setattr(auto_module, "_load", no_reading)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 8, dtype=dtype)
        assert ops.rms_norm(x, torch.ones(8, dtype=dtype), 1e-5).shape == x.shape
        assert ops.swiglu(x, x).shape == x.shape
        assert ops.gelu(x).shape == x.shape
        assert ops.choice("rms_norm", "cpu", dtype) is ops._fused
        assert ops.choice("gelu", "cpu", dtype) is ops._torch
