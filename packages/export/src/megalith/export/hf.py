"""Hugging Face GPT2LMHeadModel / LlamaForCausalLM / MixtralForCausalLM / Qwen3ForCausalLM / Qwen3MoeForCausalLM
export and import, one tensor at a time through mapping tables."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from megalith.core.config import ModelConfig
from megalith.export import mapping
from megalith.export.fields import Fields
from megalith.export.hf_spec import ARCHITECTURES, GPT2_ACTIVATION, spec_from_hf_config
from megalith.export.io import (
    SOURCE_READ_ERRORS,
    ModelSource,
    Progress,
    atomic_output_dir,
    copy_tokenizer_files,
    describe,
    reads_rows,
    row_blocks,
    source_paths,
)
from megalith.export.paths import file_in_folder, read_json
from megalith.export.safetensors_io import SafetensorsReader, SafetensorsWriter, tensor_nbytes
from megalith.export.spec import DTYPE_NAMES, ConversionError, model_config_from_dict, name_list

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3


# ---------------------------------------------------------------- configs


def hf_config(spec: ModelConfig, dtype: torch.dtype, token_ids: dict) -> dict:
    """config.json for the exported model (transformers v4 keys, which v5 still reads)."""
    common = {
        "architectures": [ARCHITECTURES[spec.family]],
        "vocab_size": spec.vocab_size,
        "initializer_range": spec.init_std,
        "tie_word_embeddings": spec.tie_embeddings,
        "use_cache": True,
        "torch_dtype": DTYPE_NAMES[dtype],
        # Unknown ids are written as null so that readers do not fall back to their own family defaults.
        "bos_token_id": None,
        "eos_token_id": None,
        **token_ids,
    }
    if spec.family == "gpt":
        return {
            "model_type": "gpt2",
            **common,
            "n_positions": spec.max_seq_len,
            "n_embd": spec.hidden_size,
            "n_layer": spec.num_layers,
            "n_head": spec.num_attention_heads,
            "n_inner": spec.ffn_hidden_size,
            "activation_function": GPT2_ACTIVATION,
            "layer_norm_epsilon": spec.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
        }
    if spec.family != "llama":
        return _moe_family_config(spec, common)
    rope_scaling = None
    if spec.rope_scaling is not None:
        rope_scaling = {"rope_type": "llama3", **{k: spec.rope_scaling[k] for k in spec.rope_scaling}}
    return {
        "model_type": "llama",
        **common,
        **_decoder_fields(spec),
        "rope_scaling": rope_scaling,
        "attention_bias": spec.bias,
        "attention_dropout": 0.0,
        "mlp_bias": spec.bias,
        "pretraining_tp": 1,
    }


def _decoder_fields(spec: ModelConfig) -> dict:
    """The config.json keys Llama, Mixtral and the Qwen3 families share (SwiGLU, RMSNorm, RoPE decoders)."""
    return {
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.ffn_hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_seq_len,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_base,
    }


def _moe_family_config(spec: ModelConfig, common: dict) -> dict:
    """config.json of MixtralForCausalLM, Qwen3ForCausalLM or Qwen3MoeForCausalLM (v4 keys, which v5 reads)."""
    if spec.rope_scaling is not None:
        raise ConversionError(f"{ARCHITECTURES[spec.family]} export: rope_scaling is not supported")
    out = {
        "model_type": spec.family,
        **common,
        **_decoder_fields(spec),
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "sliding_window": None,
    }
    if spec.family.startswith("qwen3"):
        out.update(attention_bias=False, use_sliding_window=False, max_window_layers=spec.num_layers)
    if spec.family == "mixtral":
        out.update(
            num_local_experts=spec.num_experts,
            num_experts_per_tok=spec.moe_top_k,
            router_aux_loss_coef=spec.moe_aux_loss_coeff,
            output_router_logits=False,
            router_jitter_noise=0.0,
        )
    elif spec.family == "qwen3_moe":
        out.update(
            num_experts=spec.num_experts, num_experts_per_tok=spec.moe_top_k,
            moe_intermediate_size=spec.expert_ffn_hidden_size, norm_topk_prob=spec.moe_norm_topk_prob,
            decoder_sparse_step=1, mlp_only_layers=[i for i in range(spec.num_layers) if not spec.is_moe_layer(i)],
            router_aux_loss_coef=spec.moe_aux_loss_coeff, output_router_logits=False,
        )  # fmt: skip
    return out


def hf_manifest(spec: ModelConfig) -> list[tuple[mapping.Entry, str, tuple[int, ...]]]:
    """(entry, Hugging Face name, shape) of every tensor of the exported model, in file order."""
    out = []
    for entry in mapping.entries(spec):
        out += [(entry, n, s) for n, s in zip(entry.hf, mapping.hf_shapes(entry, spec), strict=True)]
    return out


# ---------------------------------------------------------------- export


def to_hf(entry: mapping.Entry, tensor: torch.Tensor, spec: ModelConfig) -> list[torch.Tensor]:
    op = entry.param.hf_op
    if op == "copy":
        return [tensor]
    if op == "transpose":
        return [tensor.t().contiguous()]
    return list(torch.split(tensor, mapping.split_sizes(entry, spec), dim=0))


def _read(source: ModelSource, name: str, rows: slice | None = None) -> torch.Tensor:
    """`source.read`, its failures (a damaged checkpoint, say) turned into ConversionErrors naming the tensor."""
    try:
        return (source.read(name) if rows is None else source.read(name, rows=rows)).detach()
    except ConversionError:
        raise
    except SOURCE_READ_ERRORS as exc:
        raise ConversionError(f"tensor {name!r}: cannot read ({describe(exc)})") from None


def _check_shape(entry: mapping.Entry, shape: tuple[int, ...], spec: ModelConfig) -> None:
    expected = mapping.canonical_shape(entry, spec)
    if tuple(shape) != expected:
        raise ConversionError(
            f"tensor {entry.canonical!r} has shape {list(shape)}, the model config implies {list(expected)}"
        )


def check_source(source: ModelSource, spec: ModelConfig) -> list[mapping.Entry]:
    """The model's entries; raises naming every canonical tensor the source lacks or has in excess, and, for a
    source that declares shapes, every shape the config does not imply (before any output is laid out)."""
    names = set(source.tensor_names())
    mapping.check_tensor_count(spec, len(names), getattr(source, "path", "the source"))
    wanted = mapping.entries(spec)
    expected = {e.canonical for e in wanted}
    missing, extra = sorted(expected - names), sorted(names - expected)
    if missing or extra:
        raise ConversionError(
            f"source tensors do not match the model config: missing {name_list(missing)}, unexpected {name_list(extra)}"
        )
    if callable(getattr(source, "shape", None)):
        for entry in wanted:
            _check_shape(entry, tuple(source.shape(entry.canonical)), spec)
    return wanted


def read_checked(source: ModelSource, entry: mapping.Entry, spec: ModelConfig, dtype: torch.dtype) -> torch.Tensor:
    tensor = _read(source, entry.canonical)
    _check_shape(entry, tuple(tensor.shape), spec)
    if not tensor.is_floating_point():
        raise ConversionError(f"tensor {entry.canonical!r} has dtype {tensor.dtype}, expected a floating dtype")
    return tensor.to(device="cpu", dtype=dtype)


VOCAB_TENSORS = ("embed.weight", "output.weight")


def row_stream(
    source: ModelSource, entry: mapping.Entry, spec: ModelConfig, dtype: torch.dtype
) -> Iterator[tuple[int, torch.Tensor]] | None:
    """(first row, block) pieces of a vocabulary-sized tensor, read in row blocks, when the source supports it.

    None for other tensors or sources (they are read whole).
    """
    if entry.canonical not in VOCAB_TENSORS or not reads_rows(source):
        return None
    expected = mapping.canonical_shape(entry, spec)
    _check_shape(entry, tuple(source.shape(entry.canonical)), spec)

    def blocks() -> Iterator[tuple[int, torch.Tensor]]:
        for start, stop in row_blocks(expected[0], tensor_nbytes(dtype, expected[1:])):
            block = _read(source, entry.canonical, rows=slice(start, stop))
            if tuple(block.shape) != (stop - start, *expected[1:]):
                raise ConversionError(
                    f"tensor {entry.canonical!r}: rows {start}:{stop} came back with shape {list(block.shape)}"
                )
            if not block.is_floating_point():
                raise ConversionError(f"tensor {entry.canonical!r} has dtype {block.dtype}, expected a floating dtype")
            yield start, block.to(device="cpu", dtype=dtype)

    return blocks()


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def _token_ids(source: ModelSource, overrides: dict) -> dict:
    ids = {}
    tokenizer_dir = source.tokenizer_dir
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "generation_config.json").exists():
        path = file_in_folder(tokenizer_dir, "generation_config.json")
        gen = Fields(read_json(path), path)
        ids = {k: gen.token_ids(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if gen.has(k)}
    ids.update({k: v for k, v in overrides.items() if v is not None})
    return ids


def export_hf(source: ModelSource, out: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, force: bool = False, progress: bool = True,
              token_ids: dict | None = None) -> Path:  # fmt: skip
    """Writes `source` as a Hugging Face model directory `out`; returns its path."""
    spec = model_config_from_dict(source.model_config)
    mapping.check_family_fits_hf(spec)
    wanted = check_source(source, spec)
    manifest = hf_manifest(spec)
    shards = plan_shards([(n, tensor_nbytes(dtype, s)) for _, n, s in manifest], max_shard_bytes)
    shapes = {n: s for _, n, s in manifest}
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))
    ]  # fmt: skip
    ids = _token_ids(source, token_ids or {})
    bar = Progress(spec.num_layers + 2, enabled=progress)
    with atomic_output_dir(out, force, source_paths(source)) as tmp:
        writers, where = [], {}
        try:
            for file, names in zip(files, shards, strict=True):
                writers.append(SafetensorsWriter(tmp / file, [(n, dtype, shapes[n]) for n in names], {"format": "pt"}))
                where.update({n: writers[-1] for n in names})
            for entry in wanted:
                stream = row_stream(source, entry, spec, dtype) if entry.param.hf_op == "copy" else None
                if stream is not None:  # an embedding / output matrix, in row blocks
                    (name,) = entry.hf
                    nbytes = 0
                    for start, block in stream:
                        where[name].write_rows(name, start, block)
                        nbytes += block.numel() * block.element_size()
                    bar.tensor(mapping.group_name(entry), name, nbytes)
                    continue
                tensor = read_checked(source, entry, spec, dtype)
                for name, part in zip(entry.hf, to_hf(entry, tensor, spec), strict=True):
                    where[name].write(name, part)
                    bar.tensor(mapping.group_name(entry), name, part.numel() * part.element_size())
                del tensor
            for writer in writers:
                writer.close()
        except BaseException:
            for writer in writers:
                writer.abort()
            raise
        bar.close()
        if len(files) > 1:
            index = {
                "metadata": {"total_size": sum(w.total_bytes for w in writers)},
                "weight_map": {n: f for f, names in zip(files, shards, strict=True) for n in names},
            }
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_config(spec, dtype, ids), indent=2) + "\n")
        generation = {"_from_model_config": True, **ids}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if source.tokenizer_dir is not None:
            copy_tokenizer_files(source.tokenizer_dir, tmp, skip=("generation_config.json",))
    return Path(out)


# ---------------------------------------------------------------- import

_ROTARY_BUFFERS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_IGNORED = {
    "gpt": re.compile(r"^transformer\.h\.\d+\.attn\.(masked_)?bias$"),  # causal-mask buffers of old checkpoints
    "llama": _ROTARY_BUFFERS,
    "mixtral": _ROTARY_BUFFERS,
    "qwen3": _ROTARY_BUFFERS,
    "qwen3_moe": _ROTARY_BUFFERS,
}


def read_index(index: Path) -> dict[str, str]:
    """The weight_map of a safetensors index (tensor name -> file name), every file checked to lie in its folder."""
    doc = read_json(index)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ConversionError(f"{index}: not a safetensors index (needs a 'weight_map' of tensor name -> file name)")
    for file in sorted(set(weight_map.values())):
        file_in_folder(index.parent, file, listed_in=index)
    return weight_map


def _weight_files(hf_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a Hugging Face directory (single file or index + shards)."""
    index, single = hf_dir / INDEX_FILE, hf_dir / "model.safetensors"
    if index.exists():
        return {name: hf_dir / file for name, file in read_index(index).items()}
    if single.exists():
        return dict.fromkeys(SafetensorsReader(file_in_folder(hf_dir, single.name)).names(), single)
    if any(hf_dir.glob("*.bin")) or any(hf_dir.glob("*.pt")):
        raise ConversionError(f"{hf_dir}: only safetensors weights are read (pickled .bin/.pt files are never loaded)")
    raise ConversionError(f"{hf_dir}: has neither model.safetensors nor {INDEX_FILE}")


class HFModelSource:
    """A Hugging Face GPT-2, Llama, Mixtral, Qwen3 or Qwen3-MoE directory seen as canonical tensors (a
    `ModelSource`)."""

    def __init__(self, hf_dir: str | os.PathLike, dtype: torch.dtype | None = None):
        self.path = Path(hf_dir)
        config_path = file_in_folder(self.path, "config.json")
        self.hf_config = read_json(config_path)
        self.spec = spec_from_hf_config(self.hf_config, config_path)
        self.dtype = dtype
        self._readers: dict[Path, SafetensorsReader] = {}
        self._files = self._normalised(_weight_files(self.path))
        mapping.check_tensor_count(self.spec, len(self._files), config_path, side="hf")
        self._entries = {e.canonical: e for e in mapping.entries(self.spec)}
        self._check()

    @staticmethod
    def looks_like(path: str | os.PathLike) -> bool:
        path = Path(path)
        # exists(), not is_file(): a damaged file (a directory, unreadable) is reported by the reader, by name.
        return (path / "config.json").exists() and (
            (path / "model.safetensors").exists() or (path / INDEX_FILE).exists()
        )

    def _normalised(self, files: dict[str, Path]) -> dict[str, tuple[Path, str]]:
        """Hugging Face name -> (file, name stored in the file), without buffers that are not weights."""
        # The original GPT-2 checkpoints name tensors without the "transformer." prefix.
        strip = self.spec.family == "gpt" and not any(n.startswith("transformer.") for n in files)
        ignored = _IGNORED[self.spec.family]
        out = {}
        for stored, path in files.items():
            name = "transformer." + stored if strip and not stored.startswith("lm_head.") else stored
            if not ignored.search(name):
                out[name] = (path, stored)
        if self.spec.tie_embeddings:
            out.pop("lm_head.weight", None)  # some tied checkpoints also store the shared matrix
        return out

    def _reader(self, path: Path) -> SafetensorsReader:
        if path not in self._readers:
            self._readers[path] = SafetensorsReader(path)
        return self._readers[path]

    def _check(self) -> None:
        expected = hf_manifest(self.spec)
        names = {n for _, n, _ in expected}
        missing, extra = sorted(names - self._files.keys()), sorted(self._files.keys() - names)
        if missing or extra:
            raise ConversionError(
                f"{self.path}: tensors do not match config.json: missing {name_list(missing)}, "
                f"unexpected {name_list(extra)}"
            )
        for _, name, shape in expected:
            path, stored = self._files[name]
            found = self._reader(path).shape(stored)
            if found != shape:
                raise ConversionError(
                    f"{path}: tensor {stored!r} has shape {list(found)}, config.json implies {list(shape)}"
                )

    @property
    def model_config(self) -> dict:
        return self.spec.to_dict()

    @property
    def tokenizer_dir(self) -> Path:
        return self.path

    def tensor_names(self) -> list[str]:
        return list(self._entries)

    def read(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        parts = []
        for hf_name in entry.hf:
            path, stored = self._files[hf_name]
            part = self._reader(path).read(stored)
            if not part.is_floating_point():
                tag = self._reader(path).dtype_tag(stored)
                raise ConversionError(f"{path}: tensor {stored!r} has dtype {tag}, expected a floating dtype")
            parts.append(part)
        op = entry.param.hf_op
        tensor = parts[0].t().contiguous() if op == "transpose" else parts[0] if op == "copy" else torch.cat(parts)
        return tensor if self.dtype is None else tensor.to(self.dtype)

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every canonical tensor in canonical order, one at a time."""
        for name in self._entries:
            yield name, self.read(name)
