"""Autograd collectives and each tensor-parallel layer, forward and backward, against full one-process tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megalith.core import (
    ColumnParallelLinear,
    ParallelDims,
    RowParallelLinear,
    VocabParallelEmbedding,
    padded_vocab_size,
    vocab_parallel_cross_entropy,
)
from megalith.core.parallel import mappings
from megalith.core.parallel.cross_entropy import _VocabParallelCrossEntropy
from megalith.core.placement import placement
from tests.core.parallel_checks import gather_canonical
from tests.harness import run_distributed

B, S, H = 2, 8, 12


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _fwd_bwd(fn, x, grad_out):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(grad_out)
    return y.detach(), x.grad


def _check_mappings(dims):
    g, tp, r = dims.tp_group, dims.tp, dims.tp_rank
    full = _rand(B, S, H * tp, seed=1)
    per_rank = [_rand(B, S, H * tp, seed=10 + i) for i in range(tp)]
    total = sum(per_rank)

    y, gx = _fwd_bwd(lambda x: mappings.copy_to_tp_region(x, g), full, per_rank[r])
    torch.testing.assert_close(y, full)
    torch.testing.assert_close(gx, total)

    y, gx = _fwd_bwd(lambda x: mappings.reduce_from_tp_region(x, g), per_rank[r], full)
    torch.testing.assert_close(y, total)
    torch.testing.assert_close(gx, full)

    chunks = [c.chunk(tp, dim=-1) for c in per_rank]
    y, gx = _fwd_bwd(lambda x: mappings.scatter_to_tp_region(x, g), full, chunks[r][r])
    torch.testing.assert_close(y, full.chunk(tp, dim=-1)[r])
    torch.testing.assert_close(gx, torch.cat([chunks[i][i] for i in range(tp)], dim=-1))

    y, gx = _fwd_bwd(lambda x: mappings.gather_from_tp_region(x, g), full.chunk(tp, dim=-1)[r], per_rank[0])
    torch.testing.assert_close(y, full)
    torch.testing.assert_close(gx, per_rank[0].chunk(tp, dim=-1)[r])

    seq = [c.chunk(tp, dim=1) for c in per_rank]
    y, gx = _fwd_bwd(lambda x: mappings.scatter_to_sequence_parallel_region(x, g), full, seq[r][r])
    torch.testing.assert_close(y, full.chunk(tp, dim=1)[r])
    torch.testing.assert_close(gx, torch.cat([seq[i][i] for i in range(tp)], dim=1))

    y, gx = _fwd_bwd(
        lambda x: mappings.gather_from_sequence_parallel_region(x, g), full.chunk(tp, dim=1)[r], per_rank[r]
    )
    torch.testing.assert_close(y, full)
    torch.testing.assert_close(gx, total.chunk(tp, dim=1)[r])

    y, gx = _fwd_bwd(lambda x: mappings.reduce_scatter_to_sequence_parallel_region(x, g), per_rank[r], seq[r][r])
    torch.testing.assert_close(y, total.chunk(tp, dim=1)[r])
    torch.testing.assert_close(gx, torch.cat([seq[i][i] for i in range(tp)], dim=1))


def _local_rows(full_y, spec):
    return torch.cat([full_y.narrow(-1, gs, n) for _, n, gs in spec.pieces], dim=-1)


def _check_column(dims, sp):
    g, tp, r = dims.tp_group, dims.tp, dims.tp_rank
    parts = [4 * tp, 2 * tp, 2 * tp]  # e.g. q, k, v
    ref = torch.nn.Linear(H, sum(parts), dtype=torch.float64)
    layer = ColumnParallelLinear.from_module(ref, group=g, parts=parts, sequence_parallel=sp)
    x, grad_full = _rand(B, S, H, seed=2), _rand(B, S, sum(parts), seed=3)
    x_ref = x.clone().requires_grad_(True)
    y_ref = ref(x_ref)
    y_ref.backward(grad_full)
    x_in = x.chunk(tp, dim=1)[r] if sp else x
    spec = placement(layer, "weight").shard
    assert len(spec.pieces) == 3 and placement(layer, "weight").tp_sharded == (tp > 1)
    y, gx = _fwd_bwd(layer, x_in, _local_rows(grad_full, spec))
    torch.testing.assert_close(y, _local_rows(y_ref.detach(), spec))
    torch.testing.assert_close(gx, x_ref.grad.chunk(tp, dim=1)[r] if sp else x_ref.grad)
    torch.testing.assert_close(gather_canonical(layer.weight.grad, spec, g), ref.weight.grad)
    torch.testing.assert_close(gather_canonical(layer.bias.grad, placement(layer, "bias").shard, g), ref.bias.grad)
    # gather_output: a single-part layer returns the full output.
    gathered = ColumnParallelLinear.from_module(ref, group=g, gather_output=True)
    torch.testing.assert_close(gathered(x), y_ref.detach())


def _check_row(dims, sp):
    g, tp, r = dims.tp_group, dims.tp, dims.tp_rank
    ref = torch.nn.Linear(H * tp, H, dtype=torch.float64)
    layer = RowParallelLinear.from_module(ref, group=g, sequence_parallel=sp)
    x, grad_full = _rand(B, S, H * tp, seed=4), _rand(B, S, H, seed=5)
    x_ref = x.clone().requires_grad_(True)
    y_ref = ref(x_ref)
    y_ref.backward(grad_full)
    y, gx = _fwd_bwd(layer, x.chunk(tp, dim=-1)[r], grad_full.chunk(tp, dim=1)[r] if sp else grad_full)
    torch.testing.assert_close(y, y_ref.detach().chunk(tp, dim=1)[r] if sp else y_ref.detach())
    torch.testing.assert_close(gx, x_ref.grad.chunk(tp, dim=-1)[r])
    torch.testing.assert_close(
        gather_canonical(layer.weight.grad, placement(layer, "weight").shard, g), ref.weight.grad
    )
    bias_grad = layer.bias.grad.clone()
    assert placement(layer, "bias").sequence_parallel == sp
    if sp:
        torch.distributed.all_reduce(bias_grad, group=g)
    torch.testing.assert_close(bias_grad, ref.bias.grad)


def _check_embedding(dims, sp):
    g, tp, r = dims.tp_group, dims.tp, dims.tp_rank
    vocab = 200
    full_w = _rand(vocab, H, seed=6)
    ref = torch.nn.Embedding(vocab, H, dtype=torch.float64)
    ref.weight.data.copy_(full_w)
    src = torch.nn.Embedding(vocab, H, dtype=torch.float64)
    src.weight.data.copy_(full_w)
    layer = VocabParallelEmbedding.from_module(src, vocab, group=g, sequence_parallel=sp)
    assert layer.padded_vocab_size == padded_vocab_size(vocab, tp)
    # One device keeps the exact vocabulary; tp > 1 pads it to a multiple of 128 * tp.
    assert layer.padded_vocab_size == vocab if tp == 1 else layer.padded_vocab_size % (128 * tp) == 0
    ids = torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(8))
    grad_full = _rand(B, S, H, seed=9)
    y_ref = ref(ids)
    y_ref.backward(grad_full)
    y = layer(ids)
    y.backward(grad_full.chunk(tp, dim=1)[r] if sp else grad_full)
    torch.testing.assert_close(y, y_ref.detach().chunk(tp, dim=1)[r] if sp else y_ref.detach())
    torch.testing.assert_close(
        gather_canonical(layer.weight.grad, placement(layer, "weight").shard, g), ref.weight.grad
    )
    padding_rows = layer.vocab_start + torch.arange(layer.num_local) >= vocab
    assert (layer.weight.detach()[padding_rows] == 0).all()


def _check_cross_entropy(dims, smoothing):
    g, tp, r = dims.tp_group, dims.tp, dims.tp_rank
    vocab = 200
    vp = padded_vocab_size(vocab, tp)
    logits_full = _rand(B, S, vp, seed=11) * 4  # padding columns hold garbage that must be ignored
    labels = torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(12))
    labels[1, ::3] = -100
    ref_in = logits_full[..., :vocab].clone().requires_grad_(True)
    ref = F.cross_entropy(ref_in.transpose(1, 2), labels, reduction="none", label_smoothing=smoothing)
    grad_out = _rand(B, S, seed=13)
    ref.backward(grad_out)
    local = logits_full.chunk(tp, dim=-1)[r].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(
        local, labels, group=g, vocab_start=r * vp // tp, vocab_size=vocab, label_smoothing=smoothing
    )
    loss.backward(grad_out)
    torch.testing.assert_close(loss, ref.detach())
    full_grad = torch.cat([ref_in.grad, torch.zeros(B, S, vp - vocab, dtype=torch.float64)], dim=-1)
    torch.testing.assert_close(local.grad, full_grad.chunk(tp, dim=-1)[r])
    with pytest.raises(ValueError, match=r"labels out of range \[0, 200\)"):
        vocab_parallel_cross_entropy(local, labels.clamp(min=0) + 1000, group=g, vocab_start=0, vocab_size=vocab)


def _layers(rank, world_size):
    dims = ParallelDims.from_env(tp=world_size)
    _check_mappings(dims)
    for sp in (False, True):
        _check_column(dims, sp)
        _check_row(dims, sp)
        _check_embedding(dims, sp)
    for smoothing in (0.0, 0.2):
        _check_cross_entropy(dims, smoothing)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_parallel_layers_match_full(tp):
    run_distributed(_layers, tp)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = torch.tensor([[1e4, 0.0, -1e4]], dtype=torch.float32)
    loss = vocab_parallel_cross_entropy(logits, torch.tensor([1]))
    torch.testing.assert_close(loss, torch.tensor([1e4]))
    # The split-vocabulary path itself, in one process (tp > 1 worlds check it against F.cross_entropy too).
    loss = _VocabParallelCrossEntropy.apply(logits, torch.tensor([1]), None, 0, 3, 0.0, -100)
    torch.testing.assert_close(loss, torch.tensor([1e4]))


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_split_vocabulary_cross_entropy_in_one_process(smoothing):
    logits = _rand(3, 5, 10, seed=20).requires_grad_(True)
    labels = torch.tensor([[1, 2, -100, 4, 6]] * 3)
    loss = _VocabParallelCrossEntropy.apply(logits, labels, None, 0, 7, smoothing, -100)  # 3 padding columns
    loss.sum().backward()
    ref_in = logits.detach()[..., :7].clone().requires_grad_(True)
    ref = F.cross_entropy(ref_in.transpose(1, 2), labels, reduction="none", label_smoothing=smoothing)
    ref.sum().backward()
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(logits.grad[..., :7], ref_in.grad)
    assert (logits.grad[..., 7:] == 0).all()
