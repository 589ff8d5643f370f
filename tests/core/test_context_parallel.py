"""Context parallelism on gloo: cp 2 and 4, ring and all-gather, with and without packed documents, against one
process (logits, loss and every gradient); the load-balanced layout; configuration errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megalith.core import ParallelConfig, ParallelDims, build_loss_fn, build_model_chunks
from megalith.core.context_parallel import (
    local_positions,
    shard_microbatch,
    shard_sequence,
    unshard_sequence,
)
from megalith.core.pipeline import microbatch_loss
from tests.core.parallel_checks import build, gpt_config, llama_config
from tests.core.test_packed_documents import packed_batch
from tests.harness import run_distributed

S = 32


def _configs():
    # GPT: learned positions (fed the rank's positions), MHA; Llama: RoPE at the rank's positions, GQA 8/4.
    return {"gpt": gpt_config(max_seq_len=S), "llama": llama_config(max_seq_len=S)}


def _batch(config, documents: bool) -> dict:
    ids, labels, positions, cu = packed_batch(config.vocab_size)
    labels[0, :3] = -100  # ignored tokens, all in rank 0's first chunk: the count must still be the global one
    batch = {"input_ids": ids, "labels": labels}
    if documents:
        batch.update(position_ids=positions, cu_seqlens=cu)
    return batch


def _reference(config, batch):
    """Logits, loss and gradients of the whole micro-batch in this process alone (torch op set, SDPA)."""
    model = build(config)
    inputs = {k: batch[k] for k in ("position_ids", "cu_seqlens") if k in batch}
    logits = model(batch["input_ids"], **inputs)
    loss = microbatch_loss(build_loss_fn(model), logits, batch["labels"])
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _cp_matches(rank, world, comm):
    dims = ParallelDims.from_env(cp=world)
    assert dims.cp_rank == rank and dims.dp == 1
    mismatches = []
    for name, config in _configs().items():
        for documents in (False, True):
            batch = _batch(config, documents)
            ref_logits, ref_loss, ref_grads = _reference(config, batch)
            (model,) = build_model_chunks(config, dims, parallel=ParallelConfig(cp=world, cp_comm=comm), seed=1234)
            local = shard_microbatch(batch, dims.cp, dims.cp_rank)
            inputs = {k: local[k] for k in ("position_ids", "cu_seqlens") if k in local}
            logits = model(local["input_ids"], **inputs)
            loss = microbatch_loss(build_loss_fn(model), logits, local["labels"], local["num_loss_tokens"])
            loss.backward()
            parts = [torch.empty_like(logits) for _ in range(world)]
            dist.all_gather(parts, logits.detach().contiguous(), group=dims.cp_group)
            total = loss.detach().clone()
            dist.all_reduce(total, group=dims.cp_group)
            case = f"{name} {comm} documents={documents}"
            torch.testing.assert_close(unshard_sequence(parts), ref_logits, rtol=1e-4, atol=1e-5, msg=case)
            torch.testing.assert_close(total, ref_loss, rtol=1e-5, atol=1e-6, msg=case)
            for pname, p in model.named_parameters():
                grad = p.grad.clone()
                dist.all_reduce(grad, group=dims.cp_group)  # what DDP does over dp x cp
                if not torch.allclose(grad, ref_grads[pname], rtol=1e-4, atol=1e-6):
                    mismatches.append((case, pname, float((grad - ref_grads[pname]).abs().max())))
    return mismatches


@pytest.mark.parametrize("comm", ["ring", "allgather"])
@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_matches_one_process(cp, comm):
    for mismatches in run_distributed(_cp_matches, cp, comm, timeout=600):
        assert not mismatches, mismatches


def test_load_balanced_layout():
    """Rank i holds chunks i and 2cp-1-i; shard and unshard are inverse; positions follow the chunks."""
    x = torch.arange(2 * 16).view(2, 16)
    parts = [shard_sequence(x, 4, r) for r in range(4)]
    assert parts[0][0].tolist() == [0, 1, 14, 15] and parts[1][0].tolist() == [2, 3, 12, 13]
    assert torch.equal(unshard_sequence(parts), x)
    assert local_positions(16, 4, 2).tolist() == [4, 5, 10, 11]
    batch = {"input_ids": x, "labels": torch.full_like(x, -100), "cu_seqlens": torch.tensor([0, 16, 32])}
    batch["labels"][1, 3] = 7
    local = shard_microbatch(batch, 4, 3)
    assert local["position_ids"].tolist() == [[6, 7, 8, 9]] * 2
    assert local["cu_seqlens"] is batch["cu_seqlens"] and int(local["num_loss_tokens"]) == 1


def test_sequence_not_divisible_by_two_cp_is_named():
    with pytest.raises(ValueError, match=r"the sequence length \(12\) is not divisible by 2 \* cp = 8"):
        shard_sequence(torch.zeros(1, 12), 4, 0)
    with pytest.raises(ValueError, match=r"cp_comm must be one of ring, allgather, got 'p2p'"):
        ParallelConfig(cp=2, cp_comm="p2p")


def _decode_refusal(rank, world):
    from megalith.core.models import KVCache

    parallel = ParallelConfig(cp=2)
    (model,) = build_model_chunks(llama_config(max_seq_len=S), ParallelDims.from_config(parallel, world),
                                  parallel=parallel)  # fmt: skip
    model.eval()
    try:
        with torch.no_grad():
            KVCache(model, 1, 8).run(model, torch.zeros(1, 4, dtype=torch.int64))
    except ValueError as exc:
        return str(exc)
    return None


def test_a_context_parallel_model_refuses_to_decode_with_a_cache():
    for message in run_distributed(_decode_refusal, 2, timeout=300):
        assert message == "context-parallel attention does not decode with a KV cache; generate with cp=1"
