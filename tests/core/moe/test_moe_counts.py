"""MoE parameter counts against transformers' own models and published sizes; FLOPs of the active parameters."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megalith.core import (
    RuntimeConfig,
    build_loss_fn,
    build_model_chunks,
    count_parameters,
    flops_per_token,
    get_preset,
)
from tests.core.moe.common import moe_config

transformers = pytest.importorskip("transformers")


def _hf_count(config) -> int:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_presets_count_what_transformers_builds():
    mixtral = transformers.MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                         num_local_experts=8, num_experts_per_tok=2,
                                         tie_word_embeddings=False)  # fmt: skip
    qwen = transformers.Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                       moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                                       num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                                       tie_word_embeddings=False)  # fmt: skip
    assert count_parameters(get_preset("mixtral-8x7b")) == _hf_count(mixtral)
    assert count_parameters(get_preset("qwen3-30b-a3b")) == _hf_count(qwen)
    # The model cards: Mixtral 8x7B has 46.7B parameters (about 12.9B used per token); Qwen3-30B-A3B 30.5B, 3.3B
    # activated.
    assert round(count_parameters(get_preset("mixtral-8x7b")) / 1e9, 1) == 46.7
    assert round(count_parameters(get_preset("mixtral-8x7b"), active=True) / 1e9, 1) == 12.9
    assert round(count_parameters(get_preset("qwen3-30b-a3b")) / 1e9, 1) == 30.5
    assert round(count_parameters(get_preset("qwen3-30b-a3b"), active=True) / 1e9, 1) == 3.4  # 3.35B: "3.3B"


def test_parameter_count_matches_the_built_moe_model():
    config = moe_config(moe_layer_freq=[1, 0, 1, 1], moe_expert_bias=True)
    (model,) = build_model_chunks(config)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)  # the expert bias is state
    assert count_parameters(config) == trained


def test_flops_count_only_the_active_experts():
    config = moe_config(moe_layer_freq=[1, 0, 1, 1])
    (model,) = build_model_chunks(config, runtime=RuntimeConfig(moe_gemm="loop"))
    batch, seq = 2, config.max_seq_len
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    attention = config.num_layers * 2 * 2 * seq * config.num_attention_heads * config.head_dim
    with FlopCounterMode(display=False) as counter:
        model(ids)
    assert counter.get_total_flops() == (flops_per_token(config, seq, training=False) - attention) * batch * seq
    with FlopCounterMode(display=False) as counter:
        build_loss_fn(model)(model(ids), ids).sum().backward()
    assert counter.get_total_flops() == (flops_per_token(config, seq) - 3 * attention) * batch * seq
