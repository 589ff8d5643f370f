"""Entry points `megalith-export {hf,trtllm,verify}` and `megalith-import hf`."""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
from pathlib import Path

from megalith.core.config import ModelConfig, check_expert_parallel
from megalith.export.hf import DEFAULT_MAX_SHARD_BYTES, HFModelSource, export_hf
from megalith.export.io import (
    atomic_output_dir,
    check_output_apart,
    checkpoint_sink,
    copy_tokenizer_files,
    open_source,
    write_canonical_dir,
)
from megalith.export.spec import ConversionError, check_parallel, parse_dtype
from megalith.export.trtllm import export_trtllm
from megalith.export.verify import verify_dir

_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    size = float(match.group(1)) * _UNITS.get(match.group(2).upper(), math.nan) if match else math.nan
    if not math.isfinite(size) or size <= 0:  # too many digits overflow to inf
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a size such as 5GB, 500MB or 1000000")
    return int(size)


def _one_line(text: str) -> str:
    """`text` with control characters (newlines, terminal escapes from file or tensor names) spelled out."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _fail(prog: str, exc: Exception) -> int:
    print(f"{prog}: error: {_one_line(str(exc))}", file=sys.stderr)
    return 2


def _load(path: str, verify: str = "checksum"):
    """--load: an HF directory, a canonical directory, or a Megalith checkpoint (through ModelCheckpointReader)."""
    if HFModelSource.looks_like(path):
        return HFModelSource(path)
    return open_source(path, verify=verify)


def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megalith-export", description="Export a Megalith model.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--load", required=True, help="checkpoint root or iteration dir (or a canonical/HF dir)")
        p.add_argument("--out", required=True, help="output directory (written to a temporary name, then renamed)")
        p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="stored dtype")
        p.add_argument("--force", action="store_true", help="replace an existing output directory")
        p.add_argument("--quiet", action="store_true", help="no progress output")
        p.add_argument(
            "--verify", choices=["checksum", "size"], default="checksum",
            help="check each file of a training checkpoint: size and CRC32 (checksum) or the size only (faster)",
        )  # fmt: skip

    hf = sub.add_parser(
        "hf", help="Hugging Face GPT2LMHeadModel / LlamaForCausalLM / MixtralForCausalLM / Qwen3ForCausalLM / "
        "Qwen3MoeForCausalLM directory",
    )  # fmt: skip
    common(hf)
    hf.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES, help="e.g. 5GB")
    hf.add_argument("--bos-token-id", type=int)
    hf.add_argument("--eos-token-id", type=int)
    trt = sub.add_parser("trtllm", help="TensorRT-LLM checkpoint (config.json + rank{r}.safetensors)")
    common(trt)
    trt.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks of the engine")
    trt.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages of the engine")
    trt.add_argument(
        "--ep", type=int, default=1,
        help="expert-parallel groups of the engine's tp ranks (moe_ep_size; moe_tp_size = tp / ep), MoE models only",
    )  # fmt: skip
    verify = sub.add_parser("verify", help="check an HF or TensorRT-LLM export against its config.json")
    verify.add_argument("dir")
    return parser


def export_main(argv: list[str] | None = None) -> int:
    args = _export_parser().parse_args(argv)
    try:
        if args.command == "verify":
            problems = verify_dir(args.dir)
            for problem in problems:
                print(_one_line(problem))
            print(f"{args.dir}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
            return 1 if problems else 0
        check_output_apart(args.out, [args.load])  # the folder named, which may hold more than the source reads
        source = _load(args.load, args.verify)
        dtype = parse_dtype(args.dtype)
        if args.command == "hf":
            ids = {"bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id}
            export_hf(source, args.out, dtype=dtype, max_shard_bytes=args.max_shard_size, force=args.force,
                      progress=not args.quiet, token_ids=ids)  # fmt: skip
        else:
            export_trtllm(source, args.out, tp=args.tp, pp=args.pp, ep=args.ep, dtype=dtype, force=args.force,
                          progress=not args.quiet)  # fmt: skip
    except (ConversionError, OSError) as exc:  # OSError: the output could not be written (disk full, ...)
        return _fail("megalith-export", exc)
    print(f"wrote {args.out}")
    return 0


def _import_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megalith-import", description="Import a model into Megalith.")
    sub = parser.add_subparsers(dest="command", required=True)
    hf = sub.add_parser("hf", help="a Hugging Face GPT-2, Llama, Mixtral, Qwen3 or Qwen3-MoE directory (safetensors)")
    hf.add_argument("--hf", required=True, help="Hugging Face model directory")
    hf.add_argument("--out", required=True, help="Megalith checkpoint root to write")
    hf.add_argument("--tp", type=int, default=1, help="check the model splits over this many tensor-parallel ranks")
    hf.add_argument("--pp", type=int, default=1, help="check the model splits over this many pipeline stages")
    hf.add_argument("--ep", type=int, default=1, help="check the experts split over this many expert-parallel ranks")
    hf.add_argument("--dtype", default="fp32", choices=["bf16", "fp16", "fp32"], help="stored dtype")
    formats = "checkpoint: a Megalith training checkpoint; canonical: model.safetensors + megalith.json"
    hf.add_argument("--format", default="checkpoint", choices=["checkpoint", "canonical"], help=formats)
    hf.add_argument("--force", action="store_true", help="replace an existing output directory")
    return parser


def check_training_layout(spec: ModelConfig, tp: int, pp: int, ep: int = 1) -> None:
    """Megalith training shards q, k and v over tp (no kv duplication), needs a layer per pipeline stage and
    the same number of experts on every expert-parallel rank."""
    check_parallel(spec, tp, 1, allow_kv_duplication=False)
    if pp < 1 or spec.num_layers < pp:
        raise ConversionError(f"pp ({pp}) must be between 1 and num_layers ({spec.num_layers})")
    if ep < 1:
        raise ConversionError(f"ep ({ep}) must be at least 1")
    try:
        check_expert_parallel(spec, ep)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None


def import_main(argv: list[str] | None = None) -> int:
    args = _import_parser().parse_args(argv)
    try:
        source = HFModelSource(args.hf, dtype=parse_dtype(args.dtype))
        check_training_layout(source.spec, args.tp, args.pp, args.ep)
        sink = write_canonical_dir if args.format == "canonical" else checkpoint_sink()
        output = atomic_output_dir(args.out, args.force, [source.path])
        with tempfile.TemporaryDirectory() as staging, output as tmp:
            tokenizer = Path(staging) / "tokenizer"
            has_tokenizer = bool(copy_tokenizer_files(source.path, tokenizer))
            tmp.rmdir()  # the sink creates the directory itself (a checkpoint writer may insist on a new one)
            sink(tmp, source.model_config, source.named_tensors(), tokenizer_dir=tokenizer if has_tokenizer else None)
    except (ConversionError, OSError) as exc:  # OSError: the output could not be written (disk full, ...)
        return _fail("megalith-import", exc)
    print(f"wrote {args.out}")
    return 0
