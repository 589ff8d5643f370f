"""Text generation from a Megalith model or checkpoint: KV cache, greedy / temperature / top-k / top-p sampling.

`generate(model, token_id_lists, ...)` continues a batch of token-id prompts of different lengths: prompts are
padded (left by default, or right) and the padding is masked out of attention and out of the positions, so each
row gets exactly what it would get alone. Each row stops at its first end-of-document token. Under tensor
parallelism every rank of the tp group runs the same loop; the vocabulary-parallel logits are gathered and the
chosen tokens are broadcast from the group's first rank, so all ranks agree.

`generate_from_checkpoint(path, prompts, ...)` builds the model from a checkpoint's `megalith.json`, loads the
weights at the requested tp through `megalith.core.checkpoint` (never unpickling), takes the tokenizer from the
checkpoint's `tokenizer/` folder and returns the decoded continuations. `megalith-generate` is its command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = [
    "filter_logits",
    "gather_vocab_logits",
    "generate",
    "generate_from_checkpoint",
    "load_model",
    "load_tokenizer",
    "main",
    "sample_next_token",
]


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


def gather_vocab_logits(model, logits_BV: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [B, vocab_size] (float32) from this rank's vocabulary-parallel shard."""
    group = getattr(model, "tp_group", None)
    if group is not None and dist.get_world_size(group) > 1:
        parts = [torch.empty_like(logits_BV) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, logits_BV.contiguous(), group=group)
        logits_BV = torch.cat(parts, dim=-1)
    return logits_BV[..., : model.config.vocab_size].float()


def _broadcast_tokens(model, tokens_B: torch.Tensor) -> torch.Tensor:
    """Every tp rank takes the first rank's choice (identical logits give identical draws; this makes it sure)."""
    group = getattr(model, "tp_group", None)
    if group is not None and dist.get_world_size(group) > 1:
        dist.broadcast(tokens_B, src=dist.get_global_rank(group, 0), group=group)
    return tokens_B


# --------------------------------------------------------------------------------------------- generation


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
    from megalith.core.models import KVCache

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
        h_BLH = model.forward_cached(ids_BL, cache, valid_BS=valid_BL)
        last_B = valid_BL.shape[1] - 1 - valid_BL.flip(1).long().argmax(dim=1)  # last real token of each row
        h_BH = h_BLH[torch.arange(batch, device=device), last_B]
        finished_B = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            logits_BV = gather_vocab_logits(model, model.head(h_BH.unsqueeze(1)).squeeze(1))
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
            h_BH = model.forward_cached(tokens_B[:, None], cache, valid_BS=~finished_B[:, None])[:, 0]
    finally:
        model.train(was_training)
    return outputs


# -------------------------------------------------------------------------------------------- checkpoints


def load_tokenizer(tokenizer_dir: str | os.PathLike | None, tokenizer_type: str | None = None, tokenizer_model=None):
    """The tokenizer of a checkpoint's `tokenizer/` folder (its kind recognised from the files), or the one
    named by `tokenizer_type` / `tokenizer_model` (which take precedence)."""
    from megalith.data.tokenizers import build_tokenizer

    if tokenizer_type is not None:
        return build_tokenizer(tokenizer_type, tokenizer_model if tokenizer_model is not None else tokenizer_dir)
    if tokenizer_dir is None:
        raise ValueError(
            "the checkpoint has no tokenizer/ folder; name one with --tokenizer-type (e.g. ByteTokenizer) "
            "and --tokenizer-model"
        )
    folder = Path(tokenizer_dir)
    if (folder / "tokenizer.json").is_file():
        return build_tokenizer("HuggingFaceTokenizer", folder)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return build_tokenizer("GPT2BPETokenizer", folder)
    for suffix, kind in ((".model", "SentencePieceTokenizer"), (".tiktoken", "TikTokenizer")):
        files = sorted(folder.glob(f"*{suffix}"))
        if len(files) == 1:
            return build_tokenizer(kind, files[0])
    names = sorted(p.name for p in folder.iterdir())
    raise ValueError(
        f"{folder}: cannot tell the tokenizer kind from its files {names} (expected tokenizer.json, vocab.json "
        "with merges.txt, one *.model or one *.tiktoken); pass --tokenizer-type and --tokenizer-model"
    )


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def load_model(checkpoint_path, *, tp: int | None = None, device=None, dtype: torch.dtype | None = None):
    """Builds the model a checkpoint describes and loads its weights at tensor-parallel degree `tp`.

    Returns (model in eval mode, ModelCheckpointReader). `tp` defaults to the world size when torch.distributed
    is initialised, else 1; every rank of the world must call, and a world larger than tp holds world/tp
    replicas that compute the same. Weights are read through torch.distributed.checkpoint with a weights-only
    reader, whatever layout saved them.
    """
    from megalith.core.checkpoint import ModelCheckpointReader, load_sharded_state, model_sharded_state
    from megalith.core.config import ModelConfig
    from megalith.core.models import Transformer
    from megalith.core.parallel_dims import ParallelDims

    reader = ModelCheckpointReader(checkpoint_path)
    if reader.model_config is None:
        raise ValueError(f"{reader.path}: megalith.json has no model_config; cannot build the model")
    config = ModelConfig.from_dict(reader.model_config).replace(
        kernels="torch", recompute="none", hidden_dropout=0.0, attention_dropout=0.0
    )
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
    dims = ParallelDims(tp=tp, dp=world // tp) if distributed else None  # dp replicas repeat the same work
    model = Transformer(config, dims, device=device, dtype=dtype, empty_init=True)
    load_sharded_state(model_sharded_state(model), reader.path)
    return model.eval(), reader


def generate_from_checkpoint(
    checkpoint_path,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    tp: int | None = None,
    device=None,
    dtype: torch.dtype | None = None,
    batch_size: int = 16,
    tokenizer_type: str | None = None,
    tokenizer_model=None,
) -> list[str]:
    """Continuations (decoded text, without the prompt and without the end-of-document token) of `prompts`.

    `checkpoint_path` is a run's checkpoint root (its `latest` is followed) or one `iter_*` directory; the
    model configuration and tokenizer come from it. Prompts are processed `batch_size` at a time. Under
    torchrun every rank calls this and gets the same result (`tp` = the world size by default).
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    model, reader = load_model(checkpoint_path, tp=tp, device=device, dtype=dtype)
    tokenizer = load_tokenizer(reader.tokenizer_dir, tokenizer_type, tokenizer_model)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {model.config.vocab_size}"
        )
    eod = tokenizer.eod
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        encoded = tokenizer.encode_batch(chunk)
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"prompt {start + i} ({chunk[i]!r}) encodes to no tokens")
        new = generate(
            model, encoded, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed + start, eod=eod, vocab_limit=tokenizer.vocab_size,
        )  # fmt: skip
        texts += [tokenizer.decode([t for t in ids if t != eod]) for ids in new]
    return texts


# ------------------------------------------------------------------------------------------ command line


def _read_prompts_file(path: str) -> list[str]:
    """One prompt per line; a `.jsonl` file holds objects with a "prompt" (or "text") field per line."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--prompts-file {path}: no such file")
    prompts = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if file.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f'{path}:{number}: expected an object with a string "prompt" or "text" field')
            prompts.append(text)
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"--prompts-file {path}: no prompts in it")
    return prompts


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megalith-generate",
        description="Generate text from a Megalith checkpoint (greedy by default). Under `torchrun "
        "--nproc-per-node N` the model is split over N tensor-parallel ranks.",
    )
    parser.add_argument("--load", required=True, help="checkpoint root (follows `latest`) or an iter_* directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    source.add_argument("--prompts-file", help='a text file with one prompt per line, or .jsonl with "prompt"')
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default: the world size)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: bfloat16 on GPU, else float32")
    parser.add_argument("--device", default=None, help="default: the local GPU when there is one, else cpu")
    parser.add_argument(
        "--tokenizer-type", default=None, help="override the checkpoint's tokenizer (e.g. ByteTokenizer)"
    )
    parser.add_argument("--tokenizer-model", default=None, help="tokenizer file or folder for --tokenizer-type")
    parser.add_argument("--output", default=None, help="also write {prompt, completion} JSON lines to this file")
    return parser


def _write_jsonl_atomic(path: str, records: list[dict]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        prompts = args.prompt if args.prompt is not None else _read_prompts_file(args.prompts_file)
    except ValueError as exc:
        print(f"megalith-generate: error: {exc}", file=sys.stderr)
        return 2
    env = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from megalith.training.resilience import init_distributed

        env = init_distributed()
    try:
        device = args.device if args.device is not None else (env.device if env is not None else None)
        completions = generate_from_checkpoint(
            args.load, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, seed=args.seed, tp=args.tp, device=device,
            dtype=_DTYPES[args.dtype] if args.dtype else None, batch_size=args.batch_size,
            tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
        )  # fmt: skip
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"megalith-generate: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if env is not None:
            from megalith.training.resilience import destroy_distributed

            destroy_distributed()
    if env is None or env.rank == 0:
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            print(f"=== [{i}] {prompt}")
            print(prompt + completion)
        if args.output:
            _write_jsonl_atomic(
                args.output, [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)]
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
