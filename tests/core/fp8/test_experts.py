"""fp8 for the routed experts of a mixture-of-experts layer: each expert's projection against the float64
reference of its recipe, per-expert scales, what runs in fp8 in an MoE model, and the refused combinations.
(Expert parallelism against one process: tests/core/moe/test_expert_parallel.py.)"""

from __future__ import annotations

import pytest
import torch

from megalith.core import build_loss_fn, build_model_chunks
from megalith.core.fp8 import ChunkScaling, Fp8Config, is_fp8
from megalith.core.fp8.linear import LinearCasts, fp8_grouped_linear
from megalith.core.moe.grouped_gemm import looped_mm
from tests.core.fp8 import reference as ref
from tests.core.moe.common import make_batches, moe_config

COUNTS = [9, 0, 6, 4]  # an expert without tokens among them


def _casts(recipe: str, fmt: str = "hybrid") -> LinearCasts:
    state = ChunkScaling(Fp8Config(recipe=recipe, format=fmt, matmul="emulated"), ["layers.0.mlp.experts.fc1"])
    return LinearCasts("layers.0.mlp.experts.fc1", state, 0, group=None, k_sharded=False, n_sharded=False)


def _run(recipe, x, w, g, fmt="hybrid"):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fp8_grouped_linear(x, w, torch.tensor(COUNTS), _casts(recipe, fmt), training=True)
    y.backward(g)
    return y.detach(), x.grad, w.grad


def _operands(seed: int):
    gen = torch.Generator().manual_seed(seed)
    n, k, m = sum(COUNTS), 40, 24
    x = torch.randn(n, k, generator=gen) * 3
    w = torch.randn(len(COUNTS), m, k, generator=gen) * torch.tensor([0.05, 1.0, 0.01, 0.3])[:, None, None]
    g = torch.randn(n, m, generator=gen) * 1e-3
    return x, w, g


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_each_expert_is_an_fp8_linear_with_its_own_scales(recipe, fmt):
    """Rows of expert e against the float64 reference of one fp8 linear of (its rows, its weight): the scales
    are the expert's, so experts with weights of very different sizes each use the whole fp8 range."""
    x, w, g = _operands(3)
    y, dx, dw = _run(recipe, x, w, g, fmt)
    grad_fmt = "e5m2" if fmt == "hybrid" else "e4m3"
    start = 0
    for e, count in enumerate(COUNTS):
        rows = slice(start, start + count)
        start += count
        if count == 0:
            assert torch.equal(dw[e], torch.zeros_like(dw[e])), "an expert without tokens gets a zero gradient"
            continue
        outputs = {"y": y[rows].double(), "dx": dx[rows], "dw": dw[e]}
        ref.check_linear(outputs, x[rows], w[e], g[rows], recipe, grad_fmt, torch.float32)
    # fp8 really is coarser than the high-precision grouped product.
    assert float((y - looped_mm(x, w.transpose(1, 2), torch.tensor(COUNTS))).abs().max()) > 1e-3


def test_one_experts_weight_does_not_move_the_others_scales():
    """Tensorwise scales are per expert: scaling expert 2's weight by 1000 leaves every other expert's rows
    bit-identical (one scale over the stacked weights would change all of them)."""
    x, w, g = _operands(5)
    y, _, _ = _run("tensorwise", x, w, g)
    w2 = w.clone()
    w2[2] *= 1000.0
    y2, _, _ = _run("tensorwise", x, w2, g)
    others = torch.cat([torch.arange(0, 9), torch.arange(15, 19)])
    assert torch.equal(y2[others], y[others])
    assert not torch.equal(y2[9:15], y[9:15] * 1000.0)


def test_an_moe_model_runs_attention_shared_and_routed_experts_in_fp8():
    config = moe_config(num_layers=2)
    (model,) = build_model_chunks(config, fp8=Fp8Config(recipe="rowwise"), seed=7)
    names = model.fp8_scaling.names
    assert names == [
        "layers.0.attn.qkv", "layers.0.attn.proj", "layers.0.mlp.shared_expert.fc1", "layers.0.mlp.shared_expert.fc2",
        "layers.1.attn.qkv", "layers.1.attn.proj", "layers.1.mlp.shared_expert.fc1", "layers.1.mlp.shared_expert.fc2",
        "layers.0.mlp.experts.fc1", "layers.0.mlp.experts.fc2", "layers.1.mlp.experts.fc1", "layers.1.mlp.experts.fc2",
    ]  # fmt: skip
    for layer in model.layers.values():
        assert is_fp8(layer.mlp.experts) and is_fp8(layer.mlp.shared_expert.fc1)
        assert not is_fp8(layer.mlp.router) and not is_fp8(layer.mlp.shared_expert_gate)
        casts = layer.mlp.experts.fp8_casts
        assert [c.name for c in casts] == [names[c.index] for c in casts]
    batch = make_batches(config, 1, seed=1)[0]
    loss = build_loss_fn(model)(model(batch["input_ids"]), batch["labels"]).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_delayed_scaling_and_transformer_engine_are_refused_for_moe_models():
    with pytest.raises(ValueError, match=r"fp8.recipe=delayed is not supported for the routed experts .*"
                                         r"layers.0.mlp.experts.*tensorwise.*rowwise"):  # fmt: skip
        build_model_chunks(moe_config(num_layers=2), fp8=Fp8Config(recipe="delayed"), seed=7)
    # Layers kept out of fp8 need no expert recipe.
    (model,) = build_model_chunks(moe_config(num_layers=2), fp8=Fp8Config(recipe="delayed", last_layers_in_bf16=2))
    assert not hasattr(model.layers["0"].mlp.experts, "fp8_casts")
    with pytest.raises(ValueError, match=r"fp8\.backend=te with a mixture-of-experts model"):
        build_model_chunks(moe_config(num_layers=2), fp8=Fp8Config(recipe="tensorwise", backend="te"), seed=7)
