"""Vocab-parallel cross-entropy: kernels="fused" (megalith.kernels.ops partials + grad) and kernels="torch" agree
with the one-process F.cross_entropy (float64) at tp 1, 2 and 4, with label smoothing, ignore_index and a padded
vocabulary whose last tp=4 shard is padding only."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalith.core.parallel.cross_entropy import vocab_parallel_cross_entropy
from tests.harness import run_distributed

V, B, S = 300, 3, 5  # padded to 384 (tp1) / 512 (tp2, tp4): the tp4 shard 384..511 holds no real column


def _padded(v: int, tp: int) -> int:
    m = 128 * tp
    return (v + m - 1) // m * m


def _inputs(tp: int):
    gen = torch.Generator().manual_seed(5)
    logits = 3.0 * torch.randn(B, S, _padded(V, tp), generator=gen)
    logits[..., V:] = float("-inf")  # what the model's head emits for padding columns
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[0, :2] = -100
    labels[2, 4] = -100
    labels[1, 0] = V - 1  # the last real column (on the second-to-last shard at tp4)
    grad_out = torch.rand(B, S, generator=gen) + 0.5
    return logits, labels, grad_out


def _reference(tp: int, smoothing: float):
    logits, labels, grad_out = _inputs(tp)
    x = logits[..., :V].double().requires_grad_(True)
    loss = F.cross_entropy(x.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=-100,
                           label_smoothing=smoothing).view(B, S)  # fmt: skip
    (loss * grad_out.double()).sum().backward()
    return loss.detach(), x.grad


def _shard_results(tp: int, rank_in_group: int, group, smoothing: float):
    logits, labels, grad_out = _inputs(tp)
    width = logits.shape[-1] // tp
    out = {}
    for kernels in ("torch", "fused"):
        local = logits[..., rank_in_group * width : (rank_in_group + 1) * width].clone().requires_grad_(True)
        loss = vocab_parallel_cross_entropy(local, labels, group=group, vocab_start=rank_in_group * width,
                                            vocab_size=V, label_smoothing=smoothing, ignore_index=-100,
                                            kernels=kernels)  # fmt: skip
        (loss * grad_out).sum().backward()
        out[kernels] = (loss.detach(), local.grad)
    return out


def _worker(rank, world):
    groups = {2: [dist.new_group([0, 1]), dist.new_group([2, 3])], 4: [dist.new_group([0, 1, 2, 3])]}
    results = {}
    for smoothing in (0.0, 0.1):
        results[(1, smoothing)] = _shard_results(1, 0, None, smoothing)
        results[(2, smoothing)] = _shard_results(2, rank % 2, groups[2][rank // 2], smoothing)
        results[(4, smoothing)] = _shard_results(4, rank, groups[4][0], smoothing)
    return results


def test_fused_and_torch_vocab_parallel_cross_entropy_match_one_process():
    results = run_distributed(_worker, 4, timeout=180)
    for key in results[0]:
        tp, smoothing = key
        want_loss, want_grad = _reference(tp, smoothing)
        width = _padded(V, tp) // tp
        for rank, rank_results in enumerate(results):
            res = rank_results[key]
            shard = rank % tp
            lo, hi = shard * width, (shard + 1) * width
            want = torch.zeros(B, S, width, dtype=torch.float64)
            real = max(0, min(hi, V) - lo)
            want[..., :real] = want_grad[..., lo : lo + real]
            for kernels in ("torch", "fused"):
                loss, grad = res[kernels]
                where = f"tp={tp} smoothing={smoothing} rank={rank} kernels={kernels}"
                assert loss.dtype == torch.float32 and grad.dtype == torch.float32, where
                torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5, msg=where)
                torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-6, msg=where)
                assert torch.all(grad[labels_ignored()] == 0), where
            torch.testing.assert_close(res["fused"][0], res["torch"][0], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(res["fused"][1], res["torch"][1], rtol=1e-5, atol=1e-7)


def labels_ignored() -> torch.Tensor:
    return _inputs(1)[1] == -100


def test_fused_bfloat16_and_bad_kernels_name():
    logits, labels, _ = _inputs(1)
    x = logits.to(torch.bfloat16).requires_grad_(True)
    loss = vocab_parallel_cross_entropy(x, labels, vocab_size=V, label_smoothing=0.1, kernels="fused")
    want = F.cross_entropy(x.detach()[..., :V].double().flatten(0, 1), labels.flatten(), reduction="none",
                           label_smoothing=0.1).view(B, S)  # fmt: skip
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-4)
    loss.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.all(x.grad[..., V:] == 0)
    with pytest.raises(ValueError, match="unknown kernels 'triton'"):
        vocab_parallel_cross_entropy(logits, labels, vocab_size=V, kernels="triton")
