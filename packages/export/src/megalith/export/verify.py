"""`megalith-export verify`: compare an exported directory's files with what its config.json implies.

Only safetensors headers are read (no tensor data), so verifying a large export is fast. Every problem found is
reported, not just the first.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from megalith.core.config import ModelConfig
from megalith.export.fields import Fields
from megalith.export.hf import INDEX_FILE, hf_manifest, read_index
from megalith.export.hf_spec import hf_dtype, spec_from_hf_config
from megalith.export.mapping import check_tensor_count
from megalith.export.paths import file_in_folder, read_json
from megalith.export.safetensors_io import DTYPE_TO_TAG, SafetensorsReader
from megalith.export.spec import NAME_TO_DTYPE, ConversionError, check_parallel, model_config_from_dict
from megalith.export.trtllm import ARCHITECTURES as TRT_ARCHITECTURES
from megalith.export.trtllm import check_trt_experts, check_trt_family, trt_manifest


def verify_dir(path: str | os.PathLike) -> list[str]:
    """Every mismatch between the directory and its config.json; an empty list means it is consistent."""
    path = Path(path)
    try:
        config = read_json(file_in_folder(path, "config.json"))
        if isinstance(config, dict) and "architecture" in config:
            return _verify_trtllm(path, config)
        return _verify_hf(path, config)
    except ConversionError as exc:
        return [str(exc)]


def _header_entries(file: Path, problems: list[str]) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict]:
    """name -> (dtype tag, shape) of one file and its metadata; an unreadable file is recorded as a problem."""
    try:
        reader = SafetensorsReader(file)
    except ConversionError as exc:  # unreadable or corrupt: one problem, the other files are still checked
        problems.append(str(exc))
        return {}, {}
    return {name: (reader.dtype_tag(name), reader.shape(name)) for name in reader.names()}, reader.metadata


def _compare(where: str, found: dict, expected: list[tuple[str, torch.dtype, tuple[int, ...]]], problems: list[str]):
    want = {n: (DTYPE_TO_TAG[d], tuple(s)) for n, d, s in expected}
    for name in sorted(want.keys() - found.keys()):
        problems.append(f"{where}: missing tensor {name} ({want[name][0]} {list(want[name][1])})")
    for name in sorted(found.keys() - want.keys()):
        problems.append(f"{where}: unexpected tensor {name} ({found[name][0]} {list(found[name][1])})")
    for name in sorted(want.keys() & found.keys()):
        (tag, shape), (want_tag, want_shape) = found[name], want[name]
        if shape != want_shape:
            problems.append(f"{where}: {name} has shape {list(shape)}, config implies {list(want_shape)}")
        if tag != want_tag:
            problems.append(f"{where}: {name} has dtype {tag}, config implies {want_tag}")


def _verify_hf(path: Path, config: dict) -> list[str]:
    problems: list[str] = []
    spec = spec_from_hf_config(config, path / "config.json")
    dtype = hf_dtype(config, path / "config.json")
    index = path / INDEX_FILE
    if index.exists():
        weight_map = read_index(index)
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
        weight_map, files = None, [file_in_folder(path, "model.safetensors").name]
    else:
        return [f"{path}: has neither model.safetensors nor {INDEX_FILE}"]
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        if not (path / file).exists():
            problems.append(f"{INDEX_FILE}: lists {file}, which does not exist")
            continue
        entries, metadata = _header_entries(path / file, problems)
        if entries and metadata.get("format") != "pt":
            problems.append(f"{file}: safetensors metadata {metadata} lacks format 'pt'")
        for name, value in entries.items():
            if weight_map is not None and weight_map.get(name) != file:
                problems.append(f"{file}: holds {name}, which {INDEX_FILE} places in {weight_map.get(name)}")
            found[name] = value
    if weight_map is not None:
        for name in sorted(weight_map.keys() - found.keys()):
            problems.append(f"{INDEX_FILE}: maps {name} to {weight_map[name]}, which does not hold it")
    check_tensor_count(spec, len(found), path / "config.json", side="hf")  # bounds the list below
    _compare("model", found, [(n, dtype, s) for _, n, s in hf_manifest(spec)], problems)
    return problems


def spec_from_trt_config(config: object, path: Path) -> tuple[ModelConfig, torch.dtype, int, int, int]:
    """Model, dtype, tp, pp and moe_ep a TensorRT-LLM config.json describes, every field it uses type-checked."""
    fields = Fields(config, path)
    families = {a: f for f, a in TRT_ARCHITECTURES.items()}
    arch = fields.string("architecture")
    if arch not in families:
        raise ConversionError(f"{path}: architecture {arch!r} is not one of {sorted(families)}")
    family = families[arch]
    dtype = fields.string("dtype")
    if dtype not in NAME_TO_DTYPE:
        raise ConversionError(f"{path}: dtype {dtype!r} is not one of {sorted(NAME_TO_DTYPE)}")
    hidden, heads = fields.integer("hidden_size"), fields.integer("num_attention_heads")
    head_size = fields.integer("head_size", hidden // heads or 1)
    if head_size * heads != hidden:
        raise ConversionError(f"{path}: head_size {head_size} * {heads} heads != hidden_size {hidden}")
    moe = {}
    if family in ("llama", "mixtral"):
        bias = fields.boolean("attn_bias", False)
        if bias != fields.boolean("mlp_bias", False):
            raise ConversionError(f"{path}: attn_bias != mlp_bias is not a layout Megalith writes")
        gated, norm = True, "rmsnorm"
        if family == "mixtral":
            moe_fields = fields.nested("moe")
            if moe_fields is None:
                raise ConversionError(f"{path}: lacks the field 'moe'")
            moe = {"num_experts": moe_fields.integer("num_experts"), "moe_top_k": moe_fields.integer("top_k")}
    else:
        bias, gated, norm = fields.boolean("bias", True), fields.string("hidden_act", "gelu") == "swiglu", "layernorm"
    learned = fields.string("position_embedding_type", "learned_absolute") == "learned_absolute"
    canonical = {
        "family": family,
        "vocab_size": fields.integer("vocab_size"),
        "hidden_size": hidden,
        "num_layers": fields.integer("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_kv_heads": fields.integer("num_key_value_heads", heads),
        "ffn_hidden_size": fields.integer("intermediate_size", 4 * hidden),
        "max_seq_len": fields.integer("max_position_embeddings"),
        "norm": norm,
        "norm_eps": fields.number("norm_epsilon", 1e-5, positive=True),
        "activation": "swiglu" if gated else "gelu",
        "position_embedding": "learned" if learned else "rope",
        "bias": bias,
        "tie_embeddings": False,  # lm_head is a tensor of its own in every TensorRT-LLM checkpoint
        **moe,
    }
    try:
        spec = model_config_from_dict(canonical)
    except ConversionError as exc:
        raise ConversionError(f"{path}: {exc}") from None
    check_trt_family(spec)
    mapping_fields = fields.nested("mapping")
    if mapping_fields is None:
        raise ConversionError(f"{path}: lacks the field 'mapping'")
    tp, pp = mapping_fields.integer("tp_size", 1), mapping_fields.integer("pp_size", 1)
    world_size = mapping_fields.integer("world_size", tp * pp)
    if world_size != tp * pp:
        raise ConversionError(f"{path}: mapping world_size {world_size} != tp {tp} * pp {pp}")
    ep = mapping_fields.integer("moe_ep_size", 1)
    moe_tp = mapping_fields.integer("moe_tp_size", max(1, tp // ep))
    if moe_tp * ep != tp:
        raise ConversionError(f"{path}: mapping moe_tp_size {moe_tp} * moe_ep_size {ep} != tp_size {tp}")
    check_parallel(spec, tp, pp, allow_kv_duplication=True)
    check_trt_experts(spec, tp, ep)
    return spec, NAME_TO_DTYPE[dtype], tp, pp, ep


def _verify_trtllm(path: Path, config: dict) -> list[str]:
    problems: list[str] = []
    spec, dtype, tp, pp, ep = spec_from_trt_config(config, path / "config.json")
    present: dict[int, dict] = {}
    for file in sorted(path.glob("rank*.safetensors")):
        match = re.fullmatch(r"rank(\d+)\.safetensors", file.name)
        if match is None or int(match.group(1)) >= tp * pp:
            problems.append(f"{file.name}: unexpected file (world_size {tp * pp})")
            continue
        file_in_folder(path, file.name)
        present[int(match.group(1))] = _header_entries(file, problems)[0]
    stored = sum(len(entries) for entries in present.values())
    check_tensor_count(spec, stored, path / "config.json", side="trt", tp=tp)  # bounds the lists below
    for rank, manifest in trt_manifest(spec, dtype, tp, pp, ep).items():
        if rank not in present:
            problems.append(f"rank{rank}.safetensors: missing (world_size {tp * pp})")
            continue
        _compare(f"rank{rank}.safetensors", present[rank], manifest, problems)
    return problems
