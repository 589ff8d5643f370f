"""GPT and Llama tiny models under tp in {1, 2, 4}, sequence parallelism on and off, against one process."""

from __future__ import annotations

import copy

import pytest
import torch

from megalith.core import (
    LossConfig,
    ParallelDims,
    RuntimeConfig,
    apply_tensor_parallel,
    build_loss_fn,
    init_weights,
    named_placements,
    reduce_sequence_parallel_grads,
)
from megalith.core.parallel.layers import canonical_from_local
from megalith.core.pipeline import keep_stage
from tests.core.parallel_checks import build, gather_canonical, gather_vocab_logits, gpt_config, llama_config
from tests.harness import run_distributed

SEED = 1234
SMOOTHING = {"gpt": 0.0, "llama": 0.1}  # label smoothing exercises the vocab-parallel loss's uniform term


def _batch(config, seed=7, batch=2, seq=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    labels = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    labels[0, :3] = -100  # ignored tokens
    return ids, labels


def _loss_fn(model):
    return build_loss_fn(model, LossConfig(label_smoothing=SMOOTHING[model.config.family]))


def _run(model, ids, labels):
    logits = model(ids)
    loss = _loss_fn(model)(logits, labels)
    loss.sum().backward()
    return logits.detach(), loss.detach()


def _compare_model(config, dims, sequence_parallel):
    ref = build(config, dtype=torch.float64)
    par = build(config, dims, sequence_parallel=sequence_parallel, dtype=torch.float64)
    ids, labels = _batch(config)
    ref_logits, ref_loss = _run(ref, ids, labels)
    logits, loss = _run(par, ids, labels)
    reduce_sequence_parallel_grads(par, dims.tp_group)
    group = dims.tp_group
    torch.testing.assert_close(gather_vocab_logits(logits, config.vocab_size, group), ref_logits)
    torch.testing.assert_close(loss, ref_loss)
    assert (loss[0, :3] == 0).all()
    _check_placements(par, dims.tp, sequence_parallel)
    ref_params = {name: (p, where) for name, p, where in named_placements(ref)}
    names = [name for name, _, _ in named_placements(par)]
    assert sorted(names) == sorted(ref_params), "parameter names must be canonical whatever tp"
    for name, p, where in named_placements(par):
        r, r_where = ref_params[name]
        # Initialisation: the same canonical weights whatever tp.
        torch.testing.assert_close(
            gather_canonical(p.detach(), where.shard, group), canonical_from_local(r.detach(), r_where.shard)
        )
        assert p.grad is not None and r.grad is not None, name
        got = gather_canonical(p.grad, where.shard, group)
        torch.testing.assert_close(got, canonical_from_local(r.grad, r_where.shard), msg=lambda m, n=name: f"{n}: {m}")


def _check_placements(model, tp, sequence_parallel):
    """The placements DDP, grad clipping and checkpointing read."""
    placed = {name: where for name, _, where in named_placements(model)}
    qkv = placed["layers.0.attn.qkv.weight"]
    assert qkv.tp_sharded == (tp > 1)
    if tp > 1:  # at tp=1 parameters are full tensors and carry no ShardSpec
        assert len(qkv.shard.pieces) == 3 and qkv.shard.dim == 0
        assert placed["layers.1.mlp.fc2.weight"].shard.dim == 1
        assert placed["embed.weight"].shard.global_shape == (model.config.vocab_size, model.config.hidden_size)
    else:
        assert qkv.shard is None and placed["embed.weight"].shard is None
    for name in ("layers.0.attn_norm.weight", "final_norm.weight"):
        assert placed[name].sequence_parallel == (sequence_parallel and tp > 1), name
        assert placed[name].shard is None


def _models_match(rank, world_size, tp):
    dims = ParallelDims.from_env(tp=tp)
    for config in (gpt_config(), llama_config()):
        for sp in (False, True) if tp > 1 else (False,):
            _compare_model(config, dims, sp)
    if tp == 1:
        return
    # apply_tensor_parallel on a materialised single-device model keeps its weights and matches the build.
    config = llama_config()
    outside = apply_tensor_parallel(build(config), dims, sequence_parallel=True)
    built = build(config, dims, sequence_parallel=True)
    for (name, a), b in zip(outside.named_parameters(), built.parameters(), strict=True):
        assert torch.equal(a, b), name
    ids, labels = _batch(config)
    torch.testing.assert_close(_loss_fn(outside)(outside(ids), labels), _loss_fn(built)(built(ids), labels))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_models_match_one_process(tp):
    run_distributed(_models_match, tp, tp)


def _gqa_rejected(rank, world_size):
    dims = ParallelDims.from_env(tp=4)
    with pytest.raises(ValueError, match=r"num_kv_heads \(2\) is not divisible by tp \(4\)"):
        build(llama_config(num_kv_heads=2), dims)
    with pytest.raises(ValueError, match=r"sequence length \(6, dim 1\) is not divisible by tp \(4\)"):
        model = build(gpt_config(), dims, sequence_parallel=True)
        model(torch.zeros(1, 6, dtype=torch.long))  # 6 tokens cannot be split over 4 ranks


def test_kv_heads_fewer_than_tp_rejected():
    run_distributed(_gqa_rejected, 4)


def _dropout_streams(rank, world_size):
    dims = ParallelDims.from_env(tp=2)
    config = gpt_config()
    runtime = RuntimeConfig(hidden_dropout=0.5, attention_dropout=0.5)
    model = build(config, dims, runtime=runtime)
    x = torch.ones(4, 64)
    with model.rng.fork("replicated"):
        replicated = torch.nn.functional.dropout(x, 0.5)
    with model.rng.fork("tp"):
        sharded = torch.nn.functional.dropout(x, 0.5)
    both = [torch.empty_like(x) for _ in range(2)]
    torch.distributed.all_gather(both, replicated)
    assert torch.equal(both[0], both[1]), "replicated stream must match across tp ranks"
    torch.distributed.all_gather(both, sharded)
    assert not torch.equal(both[0], both[1]), "tp stream must differ across tp ranks"
    # The whole model with dropout is deterministic given the seed, and forks leave the default RNG alone.
    ids, _ = _batch(config)
    outs = []
    for _ in range(2):
        model = build(config, dims, runtime=runtime)
        torch.manual_seed(rank)
        before = torch.get_rng_state()
        outs.append(model(ids))
        assert torch.equal(before, torch.get_rng_state())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(model(ids), build(config, dims, runtime=runtime).eval()(ids))
    assert not torch.equal(model(ids), outs[0]), "dropout is active while training"


def test_dropout_rng_streams():
    run_distributed(_dropout_streams, 2)


def _recompute_grads(rank, world_size, sequence_parallel):
    dims = ParallelDims.from_env(tp=2)
    base = llama_config(num_layers=3)
    ids, labels = _batch(base)
    grads = {}
    for mode, every in (("none", 1), ("selective", 1), ("full", 1), ("full", 2)):
        runtime = RuntimeConfig(recompute=mode, recompute_every=every, hidden_dropout=0.2, attention_dropout=0.2)
        model = build(base, dims, sequence_parallel=sequence_parallel, runtime=runtime, dtype=torch.float64)
        _loss_fn(model)(model(ids), labels).sum().backward()
        grads[(mode, every)] = {n: p.grad for n, p in model.named_parameters()}
        if mode != "none":  # recomputation changes neither names nor parameters
            assert [n for n, _ in model.named_parameters()] == list(grads[("none", 1)])
    assert all(g is not None for g in grads[("none", 1)].values())
    for key, g in grads.items():
        for name, grad in g.items():
            torch.testing.assert_close(grad, grads[("none", 1)][name], msg=lambda m, k=key, n=name: f"{k} {n}: {m}")


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_recompute_gives_identical_grads_with_dropout(sequence_parallel):
    run_distributed(_recompute_grads, 2, sequence_parallel)


def test_pipeline_stage_slices_are_the_full_model():
    config = gpt_config(num_layers=4)
    full = build(config)
    first = keep_stage(copy.deepcopy(full), [0, 1], first=True, last=False)
    last = keep_stage(copy.deepcopy(full), [2, 3], first=False, last=True)
    assert "layers.2.attn.qkv.weight" in dict(last.named_parameters())
    assert "layers.0.attn.qkv.weight" not in dict(last.named_parameters())
    assert first.final_norm is None and last.pos_embed is None and last.embed is not None  # tied: last holds embed
    ids, _ = _batch(config)
    torch.testing.assert_close(last(first(ids)), full(ids))


def test_init_weights_depend_only_on_seed_and_name():
    config = gpt_config()
    a, b = build(config), build(config, dtype=torch.float64)
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(x.double(), y, msg=name, rtol=0, atol=1e-7)
    again = init_weights(copy.deepcopy(a), seed=SEED)
    other = init_weights(copy.deepcopy(a), seed=SEED + 1)
    for (name, x), y, z in zip(a.named_parameters(), again.parameters(), other.parameters(), strict=True):
        assert torch.equal(x, y), name
        assert torch.equal(x, z) == name.endswith(("norm.weight", ".bias")), name  # ones / zeros whatever seed


def _bf16(rank, world_size):
    dims = ParallelDims.from_env(tp=2)
    config = llama_config()
    ids, labels = _batch(config)
    ref_model = build(config, dtype=torch.bfloat16)
    par_model = build(config, dims, sequence_parallel=True, dtype=torch.bfloat16)
    ref = _loss_fn(ref_model)(ref_model(ids), labels)
    par = _loss_fn(par_model)(par_model(ids), labels)
    assert par.dtype == torch.float32 and torch.isfinite(par).all()
    torch.testing.assert_close(par, ref, rtol=2e-2, atol=2e-2)


def test_bfloat16_tensor_parallel_matches_one_process():
    run_distributed(_bf16, 2)
