"""GPT and Llama tiny models under tp in {1, 2, 4}, sequence parallelism on and off, against one process."""

from __future__ import annotations

import pytest
import torch

from megalith.core import ParallelDims, Transformer, parallelize, reduce_sequence_parallel_grads
from megalith.core.parallel.layers import canonical_from_local
from tests.core.parallel_checks import gather_canonical, gather_vocab_logits, gpt_config, llama_config
from tests.harness import run_distributed

SEED = 1234


def _batch(config, seed=7, batch=2, seq=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    labels = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    labels[0, :3] = -100  # ignored tokens
    return ids, labels


def _run(model, ids, labels):
    logits = model(ids)
    loss = model.loss(logits, labels)
    loss.sum().backward()
    return logits.detach(), loss.detach()


def _compare_model(config, dims, sequence_parallel):
    ref = Transformer(config, seed=SEED, dtype=torch.float64)
    par = Transformer(config, dims, sequence_parallel=sequence_parallel, seed=SEED, dtype=torch.float64)
    ids, labels = _batch(config)
    ref_logits, ref_loss = _run(ref, ids, labels)
    logits, loss = _run(par, ids, labels)
    reduce_sequence_parallel_grads(par, dims.tp_group)
    group = dims.tp_group
    torch.testing.assert_close(
        gather_vocab_logits(logits, config.vocab_size, group), ref_logits[..., : config.vocab_size]
    )
    torch.testing.assert_close(loss, ref_loss)
    assert (loss[0, :3] == 0).all()
    _check_attributes(par, dims.tp, sequence_parallel)
    ref_params = dict(ref.named_parameters())
    names = [name for name, _ in par.named_parameters()]
    assert sorted(names) == sorted(ref_params), "parameter names must be canonical whatever tp"
    for name, p in par.named_parameters():
        spec = getattr(p, "megalith_shard", None)
        r = ref_params[name]
        r_spec = getattr(r, "megalith_shard", None)
        # Initialisation: the same canonical weights whatever tp.
        torch.testing.assert_close(gather_canonical(p.detach(), spec, group), canonical_from_local(r.detach(), r_spec))
        assert p.grad is not None and r.grad is not None, name
        got = gather_canonical(p.grad, spec, group)
        torch.testing.assert_close(got, canonical_from_local(r.grad, r_spec), msg=lambda m, n=name: f"{n}: {m}")


def _check_attributes(model, tp, sequence_parallel):
    """The parameter attributes DDP, grad clipping and checkpointing read (see CONTRACT.md)."""
    params = dict(model.named_parameters())
    qkv = params["layers.0.attn.qkv.weight"]
    assert getattr(qkv, "megalith_tp_sharded", False) == (tp > 1)
    if tp > 1:  # at tp=1 block parameters are full tensors and carry no ShardSpec
        assert len(qkv.megalith_shard.pieces) == 3 and qkv.megalith_shard.dim == 0
        assert params["layers.1.mlp.fc2.weight"].megalith_shard.dim == 1
    embed = params["embed.weight"].megalith_shard
    assert embed.global_shape == (model.config.vocab_size, model.config.hidden_size)
    for name in ("layers.0.attn_norm.weight", "final_norm.weight"):
        assert getattr(params[name], "megalith_sequence_parallel", False) == (sequence_parallel and tp > 1), name
        assert not hasattr(params[name], "megalith_shard")


def _models_match(rank, world_size, tp):
    dims = ParallelDims.from_env(tp=tp)
    for config in (gpt_config(), llama_config()):
        for sp in (False, True):
            _compare_model(config, dims, sp)
    # parallelize() applied from outside to a built single-device model keeps its weights and matches.
    config = llama_config()
    outside = parallelize(Transformer(config, seed=SEED), dims, sequence_parallel=True)
    built = Transformer(config, dims, sequence_parallel=True, seed=SEED)
    for (name, a), b in zip(outside.named_parameters(), built.parameters(), strict=True):
        assert torch.equal(a, b), name
    ids, labels = _batch(config)
    torch.testing.assert_close(outside(ids, labels), built(ids, labels))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_models_match_one_process(tp):
    run_distributed(_models_match, tp, tp)


def _gqa_rejected(rank, world_size):
    dims = ParallelDims.from_env(tp=4)
    with pytest.raises(ValueError, match=r"num_kv_heads \(2\) is not divisible by tp \(4\)"):
        Transformer(llama_config(num_kv_heads=2), dims)
    with pytest.raises(ValueError, match=r"sequence length \(6, dim 1\) is not divisible by tp \(4\)"):
        model = Transformer(gpt_config(), dims, sequence_parallel=True)
        model(torch.zeros(1, 6, dtype=torch.long))  # 6 tokens cannot be split over 4 ranks


def test_kv_heads_fewer_than_tp_rejected():
    run_distributed(_gqa_rejected, 4)


def _dropout_streams(rank, world_size):
    dims = ParallelDims.from_env(tp=2)
    config = gpt_config(hidden_dropout=0.5, attention_dropout=0.5)
    model = Transformer(config, dims, seed=SEED)
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
    ids, labels = _batch(config)
    outs = []
    for _ in range(2):
        model = Transformer(config, dims, seed=SEED)
        torch.manual_seed(rank)
        before = torch.get_rng_state()
        outs.append(model(ids, labels))
        assert torch.equal(before, torch.get_rng_state())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(model(ids, labels), Transformer(config, dims, seed=SEED).eval()(ids, labels))


def test_dropout_rng_streams():
    run_distributed(_dropout_streams, 2)


def _recompute_grads(rank, world_size, sequence_parallel):
    dims = ParallelDims.from_env(tp=2)
    base = llama_config(hidden_dropout=0.2, attention_dropout=0.2, num_layers=3)
    ids, labels = _batch(base)
    grads = {}
    for mode, every in (("none", 1), ("selective", 1), ("full", 1), ("full", 2)):
        model = Transformer(
            base.replace(recompute=mode, recompute_every=every), dims, sequence_parallel=sequence_parallel,
            seed=SEED, dtype=torch.float64,
        )  # fmt: skip
        model(ids, labels).sum().backward()
        grads[(mode, every)] = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads[("none", 1)].values())
    for key, g in grads.items():
        for name, grad in g.items():
            torch.testing.assert_close(grad, grads[("none", 1)][name], msg=lambda m, k=key, n=name: f"{k} {n}: {m}")


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_recompute_gives_identical_grads_with_dropout(sequence_parallel):
    run_distributed(_recompute_grads, 2, sequence_parallel)


def test_pipeline_stage_slices_are_the_full_model():
    config = gpt_config(num_layers=4)
    full = Transformer(config, seed=SEED)
    first = Transformer(config, layer_ids=[0, 1], last_stage=False, seed=SEED)
    last = Transformer(config, layer_ids=[2, 3], first_stage=False, seed=SEED)
    assert "layers.2.attn.qkv.weight" in dict(last.named_parameters())
    assert first.final_norm is None and last.pos_embed is None and last.embed is not None  # tied: last holds embed
    ids, _ = _batch(config)
    h = first.embed_tokens(ids)
    for layer in list(first.layers.values()) + list(last.layers.values()):
        h = layer(h)
    torch.testing.assert_close(last.head(h), full(ids))


def _bf16(rank, world_size):
    dims = ParallelDims.from_env(tp=2)
    config = llama_config()
    ids, labels = _batch(config)
    ref = Transformer(config, seed=SEED, dtype=torch.bfloat16)(ids, labels)
    par = Transformer(config, dims, sequence_parallel=True, seed=SEED, dtype=torch.bfloat16)(ids, labels)
    assert par.dtype == torch.float32 and torch.isfinite(par).all()
    torch.testing.assert_close(par, ref, rtol=2e-2, atol=2e-2)


def test_bfloat16_tensor_parallel_matches_one_process():
    run_distributed(_bf16, 2)
