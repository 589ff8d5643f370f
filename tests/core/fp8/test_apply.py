"""apply_fp8 from outside the model: which modules change, what stays (names, placements, high-precision
modules), pipeline stages, recomputation, configuration errors, and the Transformer Engine backend's errors."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from megalith.core import build_loss_fn, build_model_chunks, named_placements
from megalith.core.checkpoint import model_sharded_state
from megalith.core.config import RuntimeConfig
from megalith.core.fp8 import BLOCK_LINEARS, Fp8Config, Fp8Training, apply_fp8, fp8_targets, is_fp8
from megalith.core.fp8 import te as te_backend
from megalith.core.models.transformer import Norm
from megalith.core.pipeline import keep_stage
from tests.core.parallel_checks import gpt_config, llama_config


def _build(config, fp8=None, **kwargs):
    (model,) = build_model_chunks(config, fp8=fp8, seed=3, **kwargs)
    return model


def test_only_the_block_linears_run_in_fp8_and_names_and_placements_are_unchanged():
    config = llama_config(num_layers=4)
    plain = _build(config)
    model = _build(config, Fp8Config(recipe="tensorwise", first_layers_in_bf16=1, last_layers_in_bf16=1))
    fp8_names = {name for name, module in model.named_modules() if is_fp8(module)}
    assert fp8_names == {f"layers.{i}.{path}" for i in (1, 2) for path in BLOCK_LINEARS}
    for name, module in model.named_modules():  # the documented high-precision modules
        if isinstance(module, (nn.Embedding, Norm)) or name in ("output", "embed"):
            assert not is_fp8(module), name
    assert model.fp8_scaling.names == sorted(fp8_names, key=lambda n: (n.split(".")[1], BLOCK_LINEARS.index(n[9:])))
    placements = {name: where for name, _, where in named_placements(model)}
    assert placements == {name: where for name, _, where in named_placements(plain)}
    assert model_sharded_state(model).keys() == model_sharded_state(plain).keys()
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(p, q), name  # the same initial weights


def test_pipeline_stages_name_their_layers_globally():
    config = gpt_config(num_layers=4)
    with torch.device("meta"):
        from megalith.core import Transformer

        stage = keep_stage(Transformer(config), [2, 3], first=False, last=True)
    names = [name for name, _ in fp8_targets(stage, Fp8Config(recipe="delayed", last_layers_in_bf16=1))]
    assert names == [f"layers.2.{path}" for path in BLOCK_LINEARS]


def test_applying_twice_and_a_foreign_module_are_refused():
    config = gpt_config()
    model = _build(config, Fp8Config(recipe="tensorwise"))
    with pytest.raises(ValueError, match="already run in fp8"):
        apply_fp8(model, Fp8Config(recipe="tensorwise"))
    other = _build(config)
    other.layers["1"].mlp.fc2 = nn.Sequential(nn.Linear(64, 32))
    with pytest.raises(TypeError, match=r"fp8: layers\.1\.mlp\.fc2 is a Sequential, not a linear layer"):
        apply_fp8(other, Fp8Config(recipe="tensorwise"))


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed", "rowwise"])
def test_full_recomputation_gives_the_same_fp8_gradients(recipe):
    config = gpt_config()
    fp8 = Fp8Config(recipe=recipe)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    grads, histories = [], []
    for runtime in (RuntimeConfig(), RuntimeConfig(recompute="full")):
        model = _build(config, fp8, runtime=runtime)
        manager = Fp8Training([model], None, fp8)
        for _ in range(2):
            model.zero_grad()
            build_loss_fn(model)(model(ids[:, :-1]), ids[:, 1:]).mean().backward()
            manager.step()
        grads.append([p.grad.clone() for p in model.parameters()])
        histories.append(model.fp8_scaling.history.clone())
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(*histories), "recomputed forwards record the same amaxes (the max is unchanged)"


def test_the_model_moves_and_its_scaling_state_follows():
    model = _build(gpt_config(), Fp8Config(recipe="delayed"), dtype=torch.bfloat16)
    model.to(torch.float32)
    out = model(torch.zeros(1, 4, dtype=torch.long))
    assert out.dtype == torch.float32 and model.fp8_scaling.history.device.type == "cpu"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"recipe": "mxfp8"}, "recipe 'mxfp8' needs backend 'te'"),
        ({"recipe": "rowwise", "backend": "te"}, "not a Transformer Engine recipe"),
        ({"recipe": "delayed", "backend": "te", "matmul": "emulated"}, "matmul 'emulated' applies to backend"),
        ({"recipe": "delayed", "amax_history_len": 0}, r"amax_history_len must be an integer >= 1, got 0"),
        ({"recipe": "delayed", "margin": -1}, r"margin must be an integer >= 0, got -1"),
        ({"recipe": "fp8"}, "recipe must be one of"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Fp8Config(**kwargs)


def test_missing_transformer_engine_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # import fails as when not installed
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    with pytest.raises(ImportError, match=r"fp8\.backend=te needs NVIDIA Transformer Engine.*"
                                          r"pip install 'megalith-core\[te\]'"):  # fmt: skip
        _build(gpt_config(), Fp8Config(recipe="delayed", backend="te"), device="cuda")


def test_broken_transformer_engine_names_the_extra(monkeypatch):
    def broken(name):
        raise OSError("libcudart.so.12: cannot open shared object file")

    monkeypatch.setattr(te_backend.importlib, "import_module", broken)
    with pytest.raises(ImportError, match=r"\(libcudart\.so\.12: cannot open shared object file\); pip install"):
        te_backend.import_te()


def test_transformer_engine_on_the_cpu_is_refused(monkeypatch):
    monkeypatch.setattr(te_backend, "import_te", lambda: (None, None))
    model = copy.deepcopy(_build(gpt_config()))
    with pytest.raises(ValueError, match=r"fp8\.backend=te runs on CUDA GPUs only, not cpu"):
        apply_fp8(model, Fp8Config(recipe="delayed", backend="te"))


def test_resume_state_restores_only_a_matching_delayed_state():
    config = Fp8Config(recipe="delayed", amax_history_len=4)
    model = _build(gpt_config(), config)
    manager = Fp8Training([model], None, config)
    names = set(manager.sharded_state())
    saved = {"recipe": "delayed", "amax_history_len": 4, "initialized": True}
    assert manager.resume_state(dict.fromkeys(names), saved, "ck").keys() == names
    manager.load_state_dict(saved)
    assert model.fp8_scaling.initialized
    # Fewer fp8 layers in the checkpoint (first_layers_in_bf16 differed): nothing restored, histories not filled.
    partial = dict.fromkeys(sorted(names)[2:])
    assert manager.resume_state(partial, saved, "ck") == {}
    manager.load_state_dict(saved)
    assert not model.fp8_scaling.initialized
    assert manager.resume_state(dict.fromkeys(names), {**saved, "recipe": "tensorwise"}, "ck") == {}
    with pytest.raises(ValueError, match=r"ck keeps amax histories of 8 steps but fp8\.amax_history_len is 4"):
        manager.resume_state(dict.fromkeys(names), {**saved, "amax_history_len": 8}, "ck")


def test_transformer_engine_with_full_recomputation_is_refused(monkeypatch):
    monkeypatch.setattr(te_backend, "import_te", lambda: (None, None))
    model = _build(gpt_config(), runtime=RuntimeConfig(recompute="full"))
    with pytest.raises(ValueError, match=r"fp8\.backend=te with runtime\.recompute=full is not supported"):
        apply_fp8(model, Fp8Config(recipe="delayed", backend="te"), device="cuda")


def test_fp8_with_float16_parameters_is_refused():
    with pytest.raises(ValueError, match=r"fp8 \(recipe tensorwise\) with float16 parameters is not supported"):
        _build(gpt_config(), Fp8Config(recipe="tensorwise"), dtype=torch.float16)
