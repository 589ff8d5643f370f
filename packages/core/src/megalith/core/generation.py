"""Text generation from a Megalith model or checkpoint: KV cache, greedy / temperature / top-k / top-p sampling.

`generate(model, token_id_lists, ...)` continues a batch of token-id prompts of different lengths: prompts are
padded (left by default, or right) and the padding is masked out of attention and out of the positions, so each
row gets exactly what it would get alone. Each row stops at its first end-of-document token. Under tensor
parallelism every rank of the tp group runs the same loop; the vocabulary-parallel logits are gathered and the
chosen tokens are broadcast from the group's first rank, so all ranks agree. Decoding uses the model's own op
set (`kernels="fused"` included) and its one RoPE.

`load_model(path, tp=...)` builds the model a checkpoint describes and loads its weights at any tp. Tokenizers
and the command line (`megalith-generate`) live in megalith-export, which adds text on top of this.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from megalith.core.build import build_model_chunks
from megalith.core.checkpoint import ModelCheckpointReader, load_sharded_state, model_sharded_state
from megalith.core.checkpoint.sharded import _LOCAL
from megalith.core.config import ModelConfig, RuntimeConfig
from megalith.core.models.kv_cache import KVCache
from megalith.core.parallel_dims import ParallelDims

__all__ = ["filter_logits", "gather_vocab_logits", "generate", "load_model", "sample_next_token"]


# ----------------------------------------------------------------------------------------------- sampling


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def filter_logits(logits_BV: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits with every token outside the top-k / top-p (nucleus) support set to -inf.

    top-k keeps the k largest logits of each row (0: all). top-p then keeps the smallest set of most likely
    tokens whose probability (after top-k) adds up to at least `top_p`; the most likely token always stays.
    """
    _check_sampling(0.0, top_k, top_p)
    out = logits_BV
    if 0 < top_k < out.shape[-1]:
        kth_idx = torch.topk(out, top_k, dim=-1).indices
        keep = torch.zeros_like(out, dtype=torch.bool).scatter_(-1, kth_idx, True)
        out = out.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_next_token(
    logits_BV: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row [B] (int64): argmax when `temperature` is 0 (or top_k is 1), else a draw from
    softmax(logits / temperature) restricted to the top-k / top-p support."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0.0 or top_k == 1:
        return logits_BV.argmax(dim=-1)
    filtered = filter_logits(logits_BV.float() / temperature, top_k=top_k, top_p=top_p)
    probs = torch.softmax(filtered, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _tp_group(model):
    """The tensor-parallel group the model's output vocabulary is split over (None: all of it is here)."""
    out = model.output if model.output is not None else model.embed
    return getattr(out, "group", None)


def gather_vocab_logits(model, logits_BV: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [B, vocab_size] (float32) from this rank's vocabulary-parallel shard."""
    group = _tp_group(model)
    if group is not None and dist.get_world_size(group) > 1:
        parts = [torch.empty_like(logits_BV) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, logits_BV.contiguous(), group=group)
        logits_BV = torch.cat(parts, dim=-1)
    return logits_BV[..., : model.config.vocab_size].float()


def _broadcast_tokens(model, tokens_B: torch.Tensor) -> torch.Tensor:
    """Every tp rank takes the first rank's choice (identical logits give identical draws; this makes it sure)."""
    group = _tp_group(model)
    if group is not None and dist.get_world_size(group) > 1:
        dist.broadcast(tokens_B, src=dist.get_global_rank(group, 0), group=group)
    return tokens_B


# --------------------------------------------------------------------------------------------- generation


def _decode_step(model, cache: KVCache, ids_BS, valid_BS, select_B) -> torch.Tensor:
    """Appends `ids_BS` to the cache and returns the full-vocabulary logits [B, V] at position `select_B`."""
    logits_B1V = cache.run(model, ids_BS, valid_BS=valid_BS, select_B=select_B)
    return gather_vocab_logits(model, logits_B1V[:, 0])


def _pad(token_id_lists, pad_id: int, side: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in token_id_lists)
    ids_BL = torch.full((len(token_id_lists), width), pad_id, dtype=torch.long)
    valid_BL = torch.zeros(len(token_id_lists), width, dtype=torch.bool)
    for row, ids in enumerate(token_id_lists):
        cols = slice(width - len(ids), width) if side == "left" else slice(0, len(ids))
        ids_BL[row, cols] = torch.tensor(ids, dtype=torch.long)
        valid_BL[row, cols] = True
    return ids_BL.to(device), valid_BL.to(device)


@torch.no_grad()
def generate(
    model,
    token_id_lists: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eod: int | None = None,
    padding_side: str = "left",
    vocab_limit: int | None = None,
) -> list[list[int]]:
    """Continues each prompt; returns the new token ids per prompt.

    Args:
        model: a `megalith.core.models.Transformer` holding the whole model (pp=1; any tp, every tp rank calls).
        token_id_lists: the prompts, each a non-empty list of token ids (lengths may differ).
        max_new_tokens: at most this many tokens per prompt.
        temperature: 0 is greedy (argmax); otherwise logits are divided by it before sampling.
        top_k: sample among the k most likely tokens only (0: no limit).
        top_p: sample among the most likely tokens holding this much probability (1: no limit).
        seed: seeds the sampling generator (the same seed gives the same text).
        eod: a row stops after producing this token (it is included in the output); None: never stop early.
        padding_side: "left" or "right"; the result does not depend on it.
        vocab_limit: only ids below this are generated (a tokenizer smaller than the model's vocabulary).
    """
    _check_sampling(temperature, top_k, top_p)
    config = model.config
    prompts = [[int(t) for t in ids] for ids in token_id_lists]
    if not prompts:
        return []
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    for i, ids in enumerate(prompts):
        if not ids:
            raise ValueError(f"prompt {i} is empty; generation needs at least one token to condition on")
        bad = [t for t in ids if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {config.vocab_size})")
    if vocab_limit is not None and not 0 < vocab_limit <= config.vocab_size:
        raise ValueError(f"vocab_limit must be in [1, {config.vocab_size}], got {vocab_limit}")
    longest = max(len(ids) for ids in prompts)
    if longest + max_new_tokens > config.max_seq_len:
        raise ValueError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_seq_len ({config.max_seq_len})"
        )
    outputs: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return outputs
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(int(seed))
    was_training = model.training
    model.eval()
    try:
        pad_id = 0 if eod is None else int(eod)
        ids_BL, valid_BL = _pad(prompts, pad_id, padding_side, device)
        batch = len(prompts)
        cache = KVCache(model, batch, ids_BL.shape[1] + max_new_tokens)
        last_B = valid_BL.shape[1] - 1 - valid_BL.flip(1).long().argmax(dim=1)  # last real token of each row
        logits_BV = _decode_step(model, cache, ids_BL, valid_BL, last_B)
        finished_B = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            if vocab_limit is not None:
                logits_BV = logits_BV[:, :vocab_limit]
            tokens_B = sample_next_token(
                logits_BV, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
            tokens_B = _broadcast_tokens(model, tokens_B.masked_fill(finished_B, pad_id))
            for row, (token, done) in enumerate(zip(tokens_B.tolist(), finished_B.tolist(), strict=True)):
                if not done:
                    outputs[row].append(token)
            if eod is not None:
                finished_B |= tokens_B == eod
            if step == max_new_tokens - 1 or bool(finished_B.all()):
                break
            zeros_B = torch.zeros(batch, dtype=torch.long, device=device)
            logits_BV = _decode_step(model, cache, tokens_B[:, None], ~finished_B[:, None], zeros_B)
    finally:
        model.train(was_training)
    return outputs


# ------------------------------------------------------------------------------------------- checkpoints


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def load_model(
    checkpoint_path,
    *,
    tp: int | None = None,
    device=None,
    dtype: torch.dtype | None = None,
    kernels: str = "torch",
    verify: str = "checksum",
):
    """Builds the model a checkpoint describes and loads its weights at tensor-parallel degree `tp`.

    Returns (model in eval mode, ModelCheckpointReader). `tp` defaults to the world size when torch.distributed
    is initialised, else 1; every rank of the world must call, and a world larger than tp holds world/tp
    replicas that compute the same. Weights are read whatever layout saved them (nothing is unpickled), with
    the op set `kernels`.
    """
    reader = ModelCheckpointReader(checkpoint_path, verify=verify)
    if reader.model_config is None:
        raise ValueError(f"{reader.path}: megalith.json has no model_config; cannot build the model")
    config = ModelConfig.from_dict(reader.model_config)
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    tp = world if tp is None else int(tp)
    if tp < 1:
        raise ValueError(f"tp must be positive, got {tp}")
    if world % tp:
        hint = f"; run under `torchrun --nproc-per-node {tp}`" if world == 1 else ""
        raise ValueError(f"generation with tp={tp} needs a world of a multiple of {tp} processes, found {world}{hint}")
    device = _default_device() if device is None else torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dims = ParallelDims(tp=tp, dp=world // tp)  # dp replicas repeat the same work
    (model,) = build_model_chunks(
        config, dims, runtime=RuntimeConfig(kernels=kernels), device=device, dtype=dtype, empty=True
    )
    load_sharded_state(model_sharded_state(model), reader.path, process_group=None if distributed else _LOCAL,
                       verify=verify)  # fmt: skip
    return model.eval(), reader
