"""The MoE layer in one process against a per-token loop, recomputation, layer patterns and bad configurations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megalith.core import ModelConfig, ParallelConfig, RuntimeConfig, build_loss_fn, build_model_chunks
from megalith.core.loss import take_aux_losses
from megalith.core.moe import MoE
from megalith.core.moe.stats import finish_moe_step
from tests.core.moe.common import make_batches, moe_config
from tests.core.moe.test_router import _keep_by_rule


def _expert(x, fc1, fc2):
    gate, up = (x @ fc1.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ fc2.t()


def _per_token(moe: MoE, x_BSH: torch.Tensor) -> torch.Tensor:
    """The layer's definition, token by token: fp32 router, top-k by (score + bias, then index), weights,
    the capacity rule, the experts, the gated shared expert."""
    c = moe.config
    x = x_BSH.reshape(-1, x_BSH.shape[-1])
    logits = x.float() @ moe.router.weight.float().t()
    scores = torch.softmax(logits, -1) if c.moe_score_function == "softmax" else torch.sigmoid(logits)
    bias = moe.router.expert_bias
    choose = scores.detach() + (0 if bias is None else bias)
    experts = torch.tensor([sorted(range(c.num_experts), key=lambda e: (-float(row[e]), e))[: c.moe_top_k]
                            for row in choose])  # fmt: skip
    weights = scores.gather(1, experts)
    if c.moe_norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    keep = torch.ones_like(experts, dtype=torch.bool)
    if c.moe_capacity_factor is not None:
        cap = math.ceil(c.moe_capacity_factor * x.shape[0] * c.moe_top_k / c.num_experts)
        keep = _keep_by_rule(experts, weights.detach(), c.num_experts, cap, c.moe_token_drop_policy)
    rows = []
    for t in range(x.shape[0]):
        out = torch.zeros(x.shape[1])
        for j in range(c.moe_top_k):
            if keep[t, j]:
                e = int(experts[t, j])
                out = out + weights[t, j] * _expert(x[t], moe.experts.fc1[e], moe.experts.fc2[e])
        rows.append(out)
    routed = torch.stack(rows)
    if moe.shared_expert is not None:
        shared = moe.shared_expert(x)
        if moe.shared_expert_gate is not None:
            shared = shared * torch.sigmoid(moe.shared_expert_gate(x))
        routed = routed + shared
    return routed.view_as(x_BSH)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"moe_norm_topk_prob": False, "moe_top_k": 3},
        {"moe_score_function": "sigmoid", "moe_expert_bias": True},
        {"moe_capacity_factor": 0.75},
        {"moe_capacity_factor": 1.0, "moe_token_drop_policy": "position", "moe_shared_expert_gate": False},
    ],
)
def test_moe_layer_matches_a_per_token_loop(overrides):
    cfg = moe_config(**overrides)
    (model,) = build_model_chunks(cfg, seed=3)
    moe = model.layers["0"].mlp
    if moe.router.expert_bias is not None:
        with torch.no_grad():
            moe.router.expert_bias.copy_(torch.linspace(-0.2, 0.2, cfg.num_experts))
    x = torch.randn(2, 8, cfg.hidden_size, generator=torch.Generator().manual_seed(4), requires_grad=True)
    grad = torch.randn(2, 8, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    got = moe(x)
    got.backward(grad)
    mine = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
    x_grad = x.grad.clone()
    moe.zero_grad()
    x.grad = None
    want = _per_token(moe, x)
    want.backward(grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_grad, x.grad, rtol=1e-5, atol=1e-5)
    for name, p in moe.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(mine[name], p.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_capacity_drops_only_in_training():
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(6))
    outputs = {}
    for factor in (None, 0.5):
        (model,) = build_model_chunks(moe_config(moe_capacity_factor=factor), seed=3)
        moe = model.layers["0"].mlp
        with torch.no_grad():
            outputs[factor, "train"] = moe(x)
            outputs[factor, "eval"] = moe.eval()(x)
    assert not torch.allclose(outputs[0.5, "train"], outputs[None, "train"])
    torch.testing.assert_close(outputs[0.5, "eval"], outputs[None, "eval"])


def _step(cfg: ModelConfig, runtime: RuntimeConfig):
    (model,) = build_model_chunks(cfg, runtime=runtime, seed=3)
    loss_fn = build_loss_fn(model)
    total = 0.0
    for batch in make_batches(cfg, 2, seed=11):
        lm = loss_fn(model(batch["input_ids"]), batch["labels"]).mean()
        aux = take_aux_losses(model)
        total = total + lm + (0.0 if aux is None else aux)
    total.backward()
    report = finish_moe_step([model])
    return total.detach(), report, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_full_recomputation_records_aux_losses_and_statistics_once():
    cfg = moe_config(moe_capacity_factor=1.0)
    base = _step(cfg, RuntimeConfig())
    recomputed = _step(cfg, RuntimeConfig(recompute="full"))
    torch.testing.assert_close(recomputed[0], base[0])
    assert recomputed[1].aux_loss == pytest.approx(base[1].aux_loss)
    assert recomputed[1].z_loss == pytest.approx(base[1].z_loss)
    assert recomputed[1].dropped_fraction == base[1].dropped_fraction
    assert recomputed[1].tokens_per_expert == base[1].tokens_per_expert
    assert sum(base[1].tokens_per_expert[0]) == 2 * 2 * 8 * cfg.moe_top_k  # micro-batches x tokens x slots
    for name, g in base[2].items():
        torch.testing.assert_close(recomputed[2][name], g, msg=name)


def test_aux_and_z_losses_move_the_router():
    cfg = moe_config(moe_aux_loss_coeff=0.0, moe_z_loss_coeff=0.0, moe_shared_expert_ffn_hidden_size=None,
                     moe_shared_expert_gate=False)  # fmt: skip
    without = _step(cfg, RuntimeConfig())
    with_aux = _step(cfg.replace(moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01), RuntimeConfig())
    assert without[1].aux_loss == 0.0 and with_aux[1].aux_loss > 0.05 and with_aux[1].z_loss > 0
    router = "layers.0.mlp.router.weight"
    assert not torch.allclose(with_aux[2][router], without[2][router])
    # The last layer's experts see only the LM loss's gradient (the routers' losses flow into layer inputs).
    expert = "layers.3.mlp.experts.fc1"
    torch.testing.assert_close(with_aux[2][expert], without[2][expert])


def test_moe_layer_pattern():
    every_other = moe_config(moe_layer_freq=2)
    listed = moe_config(moe_layer_freq=[0, 1, 1, 0])
    assert [every_other.is_moe_layer(i) for i in range(4)] == [True, False, True, False]
    assert [listed.is_moe_layer(i) for i in range(4)] == [False, True, True, False]
    (model,) = build_model_chunks(listed)
    assert [isinstance(layer.mlp, MoE) for layer in model.layers.values()] == [False, True, True, False]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"moe_top_k": 9}, r"moe_top_k \(9\) exceeds num_experts \(8\)"),
        ({"bias": True}, r"experts have no biases; set bias = false \(num_experts = 8\)"),
        ({"moe_layer_freq": [1, 0]}, r"moe_layer_freq as a list needs one 0 or 1 per layer \(4\), got \[1, 0\]"),
        ({"moe_layer_freq": [0, 0, 0, 0]}, r"moe_layer_freq \[0, 0, 0, 0\] selects no layer"),
        ({"moe_capacity_factor": 0.0}, r"moe_capacity_factor must be a positive finite number, got 0.0"),
        ({"moe_shared_expert_ffn_hidden_size": None}, r"moe_shared_expert_gate needs a shared expert"),
        ({"moe_score_function": "relu"}, r"moe_score_function must be one of \('softmax', 'sigmoid'\)"),
    ],
)
def test_bad_moe_configurations_name_the_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        moe_config(**overrides)


def test_bad_expert_parallel_layouts_name_the_values():
    with pytest.raises(ValueError, match=r"parallel.ep \(3\) does not divide the data-parallel size 4 \(world size 8"):
        ParallelConfig(tp=2, ep=3).data_parallel(8)
    with pytest.raises(ValueError, match=r"expert_tp \(2\) must be 1 or tp \(4\)"):
        ParallelConfig(tp=4, expert_tp=2)
    with pytest.raises(ValueError, match=r"moe_dispatcher must be one of"):
        ParallelConfig(moe_dispatcher="ring")
    from megalith.core.config import check_expert_parallel

    with pytest.raises(ValueError, match=r"num_experts \(6\) is not divisible by ep \(4\)"):
        check_expert_parallel(moe_config(num_experts=6), 4)
    with pytest.raises(ValueError, match=r"ep \(2\) > 1 needs a mixture-of-experts model"):
        check_expert_parallel(moe_config(num_experts=0), 2)
