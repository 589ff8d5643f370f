"""Packed documents in one process: a packed batch (cu_seqlens, positions restarting per document) gives each
document exactly what running it alone gives (logits, loss), with the torch op set (block-masked SDPA) and with
the fused kernels (varlen attention); bad document bounds are refused with a message naming the problem."""

from __future__ import annotations

import pytest
import torch

from megalith.core import RuntimeConfig, build_loss_fn
from megalith.core.models.packing import Documents, join_row_bounds
from tests.core.parallel_checks import build, gpt_config, llama_config

ROWS = [[5, 11, 3, 13], [32], [1, 30, 1]]  # document lengths of each row (S = 32)
S = 32


def packed_batch(vocab: int, rows=ROWS, seed: int = 3):
    """input_ids, labels, position_ids (restarting per document) and cu_seqlens of documents `rows`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(rows), S), generator=g)
    labels = torch.randint(0, vocab, (len(rows), S), generator=g)
    positions = torch.cat([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows]).view(len(rows), S)
    starts = [0]
    for lengths in rows:
        for n in lengths:
            starts.append(starts[-1] + n)
    return ids, labels, positions, torch.tensor(starts, dtype=torch.int32)


@pytest.mark.parametrize("kernels", ["torch", "fused"])
@pytest.mark.parametrize("make_config", [gpt_config, llama_config], ids=["gpt", "llama"])
def test_packed_documents_equal_each_document_alone(make_config, kernels):
    config = make_config(max_seq_len=S)
    model = build(config, runtime=RuntimeConfig(kernels=kernels))
    loss_fn = build_loss_fn(model, kernels=kernels)
    ids, labels, positions, cu = packed_batch(config.vocab_size)
    logits = model(ids, position_ids=positions, cu_seqlens=cu)
    loss = loss_fn(logits, labels)
    for row, lengths in enumerate(ROWS):
        start = 0
        for n in lengths:
            doc = slice(start, start + n)
            alone = model(ids[row : row + 1, doc])
            torch.testing.assert_close(logits[row : row + 1, doc], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(loss[row : row + 1, doc], loss_fn(alone, labels[row : row + 1, doc]))
            start += n
    # Without the document bounds the same tokens attend across documents: the check above can fail.
    assert not torch.allclose(model(ids, position_ids=positions), logits, atol=1e-3)


def test_packed_gradients_match_between_op_sets():
    """Backward through the block-masked SDPA and through the varlen kernel agree."""
    config = llama_config(max_seq_len=S)
    grads = {}
    for kernels in ("torch", "fused"):
        model = build(config, runtime=RuntimeConfig(kernels=kernels))
        ids, labels, positions, cu = packed_batch(config.vocab_size)
        build_loss_fn(model)(model(ids, position_ids=positions, cu_seqlens=cu), labels).mean().backward()
        grads[kernels] = {n: p.grad for n, p in model.named_parameters()}
    for name, g in grads["torch"].items():
        torch.testing.assert_close(grads["fused"][name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_document_bounds_are_checked():
    with pytest.raises(ValueError, match=r"row start 32 is missing"):
        Documents.from_cu_seqlens(torch.tensor([0, 20, 40, 64], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match=r"cu_seqlens must be a 1-D int32 tensor"):
        Documents.from_cu_seqlens(torch.tensor([0, 32]), 1)
    with pytest.raises(ValueError, match=r"non-decreasing"):
        Documents.from_cu_seqlens(torch.tensor([0, 20, 10, 32], dtype=torch.int32), 1)
    model = build(llama_config(max_seq_len=S))
    ids, _, _, cu = packed_batch(model.config.vocab_size)
    with pytest.raises(ValueError, match=r"cu_seqlens describes a \[3, 32\] batch, the input is \[3, 16\]"):
        model(ids[:, :16], cu_seqlens=cu)


def test_join_row_bounds():
    """Per-row starts padded by repeating S (as a data loader stacks them) -> one cu_seqlens for the batch."""
    rows = torch.tensor([[0, 5, 16, 19, 32, 32], [0, 32, 32, 32, 32, 32]])
    assert join_row_bounds(rows, S).tolist() == [0, 5, 16, 19, 32, 64]
    with pytest.raises(ValueError, match=r"rise from 0 to the sequence length 32"):
        join_row_bounds(torch.tensor([[0, 5, 31]]), S)
