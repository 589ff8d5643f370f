"""Single-process checks: config validation and presets, ParallelDims rules and groups, FLOPs and parameter
counts against independent counts, RNG streams, RoPE, the kernels switch."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megalith.core import (
    PRESETS,
    ModelConfig,
    ParallelConfig,
    ParallelDims,
    RNGTracker,
    RuntimeConfig,
    build_loss_fn,
    count_parameters,
    flops_per_token,
    get_preset,
)
from megalith.core.models import rope_tables_at
from megalith.core.parallel.random import derive_seed
from tests.core.parallel_checks import build, gpt_config, llama_config
from tests.harness import run_distributed


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_size": 30}, r"hidden_size \(30\) is not divisible by num_attention_heads \(4\)"),
        ({"num_kv_heads": 3}, r"num_attention_heads \(4\) is not divisible by num_kv_heads \(3\)"),
        ({"norm": "batchnorm"}, r"ModelConfig.norm must be one of \('layernorm', 'rmsnorm'\), got 'batchnorm'"),
        ({"num_layers": 0}, r"ModelConfig.num_layers must be a positive integer, got 0"),
        ({"tie_embeddings": "false"}, r"ModelConfig.tie_embeddings must be true or false, got 'false'"),
        ({"norm_eps": float("nan")}, r"ModelConfig.norm_eps must be a positive finite number, got nan"),
        ({"rope_scaling": {"factor": 2.0}}, r"rope_scaling must have exactly the keys"),
    ],
)
def test_config_validation_messages(changes, message):
    with pytest.raises(ValueError, match=message):
        gpt_config(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_dropout": 1.5}, r"RuntimeConfig.hidden_dropout must be in \[0, 1\), got 1.5"),
        ({"kernels": "fused", "attention_dropout": 0.1}, r"kernels='fused' has no attention dropout"),
        ({"recompute_every": 0}, r"RuntimeConfig.recompute_every must be >= 1, got 0"),
    ],
)
def test_runtime_config_validation_messages(changes, message):
    with pytest.raises(ValueError, match=message):
        RuntimeConfig(**changes)


def test_the_architecture_config_holds_no_run_time_switches():
    fields = {f.name for f in __import__("dataclasses").fields(ModelConfig)}
    assert not fields & {"kernels", "recompute", "recompute_every", "hidden_dropout", "attention_dropout",
                         "label_smoothing"}  # fmt: skip


def test_config_round_trips_through_json_and_presets_build():
    for name, config in PRESETS.items():
        again = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
        assert again == config, name
    assert llama_config().num_kv_heads == 4 and gpt_config().num_kv_heads == 4
    with pytest.raises(ValueError, match=r"unknown fields \['hidden'\]"):
        ModelConfig.from_dict({**gpt_config().to_dict(), "hidden": 3})
    with pytest.raises(ValueError, match=r"unknown model preset 'gpt5'"):
        get_preset("gpt5")
    assert get_preset("tiny", num_layers=3).num_layers == 3


# Published sizes (Hugging Face model cards / configs), not derived from this code.
@pytest.mark.parametrize(
    ("name", "expected"),
    [("gpt2-small", 124_439_808), ("llama3-8b", 8_030_261_248), ("llama2-7b", 6_738_415_616)],
)
def test_parameter_count_matches_published_sizes(name, expected):
    assert count_parameters(get_preset(name)) == expected


@pytest.mark.parametrize("make", [gpt_config, llama_config])
def test_parameter_count_matches_built_model(make):
    config = make(bias=True)
    model = build(config)
    assert model.embed.weight.shape[0] == config.vocab_size  # one device: the exact vocabulary
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("make", [gpt_config, llama_config])
def test_flops_match_counted_matmuls(make):
    config, batch, seq = make(vocab_size=256), 2, 16
    model = build(config)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    # Attention matmuls by hand (QK^T and AV, 2 FLOPs per multiply-add); the counter sees only the linears.
    attention = config.num_layers * 2 * 2 * seq * config.num_attention_heads * config.head_dim
    with FlopCounterMode(display=False) as counter:
        model(ids)
    assert counter.get_total_flops() == (flops_per_token(config, seq, training=False) - attention) * batch * seq
    with FlopCounterMode(display=False) as counter:
        build_loss_fn(model)(model(ids), ids).sum().backward()
    assert counter.get_total_flops() == (flops_per_token(config, seq) - 3 * attention) * batch * seq
    causal = flops_per_token(config, seq, causal=True)
    assert flops_per_token(config, seq) - causal == pytest.approx(1.5 * attention)


def test_parallel_dims_single_process_validation():
    dims = ParallelDims.single_process()
    assert (dims.tp, dims.pp, dims.dp, dims.world_size, dims.rank) == (1, 1, 1, 1, 0)
    assert dims.tp_group is None
    with pytest.raises(ValueError, match=r"tp\(2\) \* cp\(1\) \* ep\(1\) \* dp\(1\) \* pp\(1\) = 2 does not match"):
        ParallelDims(tp=2)
    with pytest.raises(ValueError, match=r"ParallelDims.pp must be a positive integer, got 0"):
        ParallelDims(pp=0)
    with pytest.raises(dataclass_frozen_error()):
        dims.tp = 2


def dataclass_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def _dims_groups(rank, world_size):
    dims = ParallelDims.from_env(tp=2, pp=2)
    assert dims.dp == 2 and dims.cp == 1 and dims.ep == 1
    # tp fastest, then cp, ep, dp, pp: written out for this layout.
    assert dims.tp_rank == rank % 2 and dims.dp_rank == (rank // 2) % 2 and dims.pp_rank == rank // 4
    assert dims.group_ranks("tp") == [rank - rank % 2, rank - rank % 2 + 1]
    assert dims.group_ranks("pp") == [rank % 4, rank % 4 + 4]
    assert dims.group_ranks("dp") == [rank % 2 + 4 * (rank // 4), rank % 2 + 4 * (rank // 4) + 2]
    assert dims.group_ranks("tp", "dp") == list(range(4 * (rank // 4), 4 * (rank // 4) + 4))
    for names in (("tp",), ("pp",), ("dp",), ("tp", "dp")):
        x = torch.tensor([float(rank)])
        torch.distributed.all_reduce(x, group=dims.group(*names))
        assert x.item() == sum(dims.group_ranks(*names)), names
    assert dims.group("dp") is dims.group("dp", "cp")  # degree-1 dims do not change a group
    with pytest.raises(
        ValueError, match=r"^ParallelDims.from_env: world size 8 is not divisible by tp \(3\) \* pp \(1\)$"
    ):
        ParallelDims.from_env(tp=3)
    # The same topology from the config a user writes.
    assert ParallelDims.from_config(ParallelConfig(tp=2, pp=2), world_size).group_ranks("dp") == dims.group_ranks("dp")
    with pytest.raises(ValueError, match=r"parallel.dp \(4\) does not match world size 8"):
        ParallelDims.from_config(ParallelConfig(tp=2, pp=2, dp=4), world_size)


def test_parallel_dims_groups_and_rank_order():
    run_distributed(_dims_groups, 8)


def test_rng_tracker_streams():
    a, b = RNGTracker(5, tp_rank=0), RNGTracker(5, tp_rank=1)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with a.fork("replicated"):
        ra = torch.rand(8)
    with b.fork("replicated"):
        rb = torch.rand(8)
    with a.fork("tp"):
        ta = torch.rand(8)
    with b.fork("tp"):
        tb = torch.rand(8)
    assert torch.equal(before, torch.get_rng_state())
    assert torch.equal(ra, rb) and not torch.equal(ta, tb)
    torch.manual_seed(derive_seed(5, "replicated", 0, 0))  # a stream starts where torch.manual_seed(its seed) does
    assert torch.equal(ra, torch.rand(8))
    with a.fork("replicated"):
        assert not torch.equal(torch.rand(8), ra)  # the stream advanced
    states = a.get_states()
    with a.fork("tp"):
        first = torch.rand(4)
    a.set_states(states)
    with a.fork("tp"):
        assert torch.equal(torch.rand(4), first)
    with pytest.raises(ValueError, match=r"unknown stream 'nope'"), a.fork("nope"):
        pass


def test_rope_rotates_pairs_by_position_angle():
    config = llama_config()
    seq, d = 12, config.head_dim
    cos, sin = rope_tables_at(torch.arange(seq), config)
    # Frequencies with wavelength above original/low_freq_factor (8 positions here) are divided by `factor`;
    # the first (wavelength 2*pi, between 8/4 and 8) is blended linearly in original/wavelength.
    plain = 1.0 / config.rope_base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.atan2(sin[1].double(), cos[1].double())
    factor = config.rope_scaling["factor"]
    torch.testing.assert_close(angles[1:], plain[1:] / factor, rtol=1e-6, atol=0)
    blend = (8 / (2 * math.pi) - 1.0) / (4.0 - 1.0)
    assert angles[0].item() == pytest.approx((1 - blend) / factor + blend, rel=1e-6)
    # Rotate-half: element i pairs with i + D/2, rotated as a complex number by position * frequency.
    from megalith.core.models import TorchOps

    x = torch.randn(1, seq, 2, d, dtype=torch.float64)
    out = TorchOps.rope(x, cos.double(), sin.double())
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * torch.polar(torch.ones_like(cos.double()), torch.atan2(
        sin.double(), cos.double()))[None, :, None, :]  # fmt: skip
    torch.testing.assert_close(out, torch.cat([z.real, z.imag], dim=-1), rtol=1e-6, atol=1e-6)


def test_fused_kernels_switch():
    config = gpt_config()
    ids = torch.randint(0, config.vocab_size, (2, 8))
    fused = build(config, runtime=RuntimeConfig(kernels="fused"), seed=3)
    plain = build(config, seed=3)
    assert type(fused.layers["0"].mlp.ops).__name__ == "FusedOps"
    torch.testing.assert_close(fused(ids), plain(ids), rtol=1e-4, atol=1e-4)


def test_init_is_seeded_by_name_and_scaled():
    config = gpt_config(num_layers=4)
    a, b, c = build(config, seed=1), build(config, seed=1), build(config, seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        if name.endswith("weight") and "norm" not in name:
            assert not torch.equal(pa, pc), name
    proj_std = a.layers["0"].attn.proj.weight.std().item()
    assert proj_std == pytest.approx(config.init_std / math.sqrt(2 * config.num_layers), rel=0.1)
