"""`megalith-generate`: text continuations of prompts from any Megalith checkpoint.

The model and its weights come through `megalith.core.generation.load_model` (any tp, nothing unpickled), the
decoding loop is `megalith.core.generation.generate`; this module adds text: the tokenizer (the checkpoint's
`tokenizer/` folder, or one named on the command line), prompt files, and the command line itself.
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

from megalith.core.checkpoint import VERIFY_CHOICES
from megalith.core.generation import generate, load_model
from megalith.core.models import KERNELS
from megalith.core.world import destroy_distributed, init_distributed
from megalith.data.tokenizers import build_tokenizer, tokenizer_from_folder

__all__ = ["generate_from_checkpoint", "load_tokenizer", "main"]


def load_tokenizer(tokenizer_dir: str | os.PathLike | None, tokenizer_type: str | None = None, tokenizer_model=None):
    """The tokenizer of a checkpoint's `tokenizer/` folder, or the one named by `tokenizer_type` /
    `tokenizer_model` (which take precedence)."""
    if tokenizer_type is not None:
        return build_tokenizer(tokenizer_type, tokenizer_model if tokenizer_model is not None else tokenizer_dir)
    if tokenizer_dir is None:
        raise ValueError(
            "the checkpoint has no tokenizer/ folder; name one with --tokenizer-type (e.g. ByteTokenizer) "
            "and --tokenizer-model"
        )
    try:
        return tokenizer_from_folder(tokenizer_dir)
    except ValueError as exc:
        raise ValueError(f"{exc}; pass --tokenizer-type and --tokenizer-model") from None


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
    kernels: str = "torch",
    verify: str = "checksum",
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
    model, reader = load_model(checkpoint_path, tp=tp, device=device, dtype=dtype, kernels=kernels, verify=verify)
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
    parser.add_argument("--kernels", choices=list(KERNELS), default="torch", help="op set (as runtime.kernels)")
    parser.add_argument(
        "--verify", choices=list(VERIFY_CHOICES), default="checksum",
        help="check each checkpoint file's size and CRC32 (checksum) or its size only",
    )  # fmt: skip
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
        env = init_distributed()
    try:
        device = args.device if args.device is not None else (env.device if env is not None else None)
        completions = generate_from_checkpoint(
            args.load, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, seed=args.seed, tp=args.tp, device=device,
            dtype=_DTYPES[args.dtype] if args.dtype else None, batch_size=args.batch_size,
            tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model, kernels=args.kernels,
            verify=args.verify,
        )  # fmt: skip
    except (ValueError, OSError, KeyError) as exc:
        print(f"megalith-generate: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if env is not None:
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
