"""TensorRT-LLM "unified checkpoint" export: config.json + rank{r}.safetensors for tp x pp ranks.

rank = pp_rank * tp + tp_rank. Column-parallel tensors are split on dim 0, row-parallel weights on dim 1 (their
biases are full on every rank); q, k and v are split separately and concatenated per rank, with each kv head
repeated tp / num_kv_heads times first when there are fewer kv heads than ranks; the gated MLP's gate half
becomes `mlp.fc` and its up half `mlp.gate`, each split separately; lm_head rows are zero-padded to a multiple of
tp. Layers are renumbered from 0 within each pipeline stage; embeddings live on the first stage, the final norm
and lm_head on the last.

Mixtral (TensorRT-LLM's LLaMA class with MoE; the layout, with the sources it was read from, is in
`reference/trtllm-moe.md` next to this package's README): the tp ranks of a stage are split into moe_ep expert
groups of moe_tp = tp / moe_ep ranks, tp rank t holding experts [moe_ep_rank * E/moe_ep, ...) with
moe_ep_rank = t % moe_ep, and slice moe_tp_rank = t // moe_ep of each expert's inner dimension. `mlp.fc` stacks
the rank's experts as [E/moe_ep, 2 I/moe_tp, H], each expert's rows being [up slice; gate slice] (the linear
half first, the activated half second); `mlp.proj` is [E/moe_ep, H, I/moe_tp]; `mlp.router` [E, H] is whole on
every rank and float32.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from megalith.core.config import ModelConfig
from megalith.export import mapping
from megalith.export.hf import check_source, read_checked, row_stream
from megalith.export.io import ModelSource, Progress, atomic_output_dir, source_paths
from megalith.export.mapping import check_family_fits_hf
from megalith.export.safetensors_io import SafetensorsWriter
from megalith.export.spec import DTYPE_NAMES, ConversionError, check_parallel, model_config_from_dict

ARCHITECTURES = {"gpt": "GPTForCausalLM", "llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}
_EXPERT_OPS = ("expert_fc1", "expert_fc2")
RENORMALIZE = 1  # MoeConfig.ExpertScaleNormalizationMode.RENORMALIZE: softmax over the chosen top-k


def check_trt_family(spec: ModelConfig) -> None:
    if spec.family not in ARCHITECTURES:
        raise ConversionError(
            f"TensorRT-LLM export writes {sorted(ARCHITECTURES.values())}; a {spec.family!r} model is not one of "
            "them (megalith-export hf writes it for current TensorRT-LLM, which reads Hugging Face directories)"
        )
    if spec.family != "gpt" and spec.head_dim * spec.num_attention_heads != spec.hidden_size:
        raise ConversionError(
            f"TensorRT-LLM export needs head_dim = hidden_size / num_attention_heads, the model config has "
            f"kv_channels {spec.kv_channels}"
        )
    if spec.family == "mixtral":
        check_family_fits_hf(spec)  # the same architecture as Hugging Face's Mixtral
    elif spec.num_experts or spec.qk_norm:
        raise ConversionError(f"TensorRT-LLM {ARCHITECTURES[spec.family]} has no experts and no qk-norm")
    if spec.family in ("llama", "mixtral"):
        wanted = {"norm": "rmsnorm", "activation": "swiglu", "position_embedding": "rope"}
    else:
        wanted = {"norm": "layernorm"}  # TensorRT-LLM's GPT class always uses LayerNorm with a bias
    for key, value in wanted.items():
        if getattr(spec, key) != value:
            raise ConversionError(
                f"TensorRT-LLM {ARCHITECTURES[spec.family]} needs {key} = {value!r}, the model config has "
                f"{getattr(spec, key)!r}"
            )


def check_trt_experts(spec: ModelConfig, tp: int, ep: int) -> None:
    """Raises when the experts cannot be split over moe_ep = `ep` groups of moe_tp = tp / ep ranks."""
    if ep < 1 or tp % ep:
        raise ConversionError(f"--ep ({ep}) must divide --tp ({tp}): moe_tp_size * moe_ep_size = tp_size")
    if ep > 1 and not spec.num_experts:
        raise ConversionError(f"--ep ({ep}) > 1 needs a mixture-of-experts model (num_experts is 0)")
    if spec.num_experts and spec.num_experts % ep:
        raise ConversionError(f"num_experts ({spec.num_experts}) is not divisible by --ep ({ep})")
    if spec.num_experts and spec.expert_ffn_hidden_size % (tp // ep):
        raise ConversionError(
            f"the experts' intermediate size ({spec.expert_ffn_hidden_size}) is not divisible by moe_tp_size "
            f"({tp // ep} = --tp {tp} / --ep {ep})"
        )


def trt_config(spec: ModelConfig, dtype: torch.dtype, tp: int, pp: int, ep: int = 1) -> dict:
    rotary_scaling = None
    if spec.rope_scaling is not None:
        # Releases differ in which key names the scaling kind; both are written (extra keys are ignored).
        rotary_scaling = {"type": "llama3", "rope_type": "llama3", **spec.rope_scaling}
    config = {
        "architecture": ARCHITECTURES[spec.family],
        "dtype": DTYPE_NAMES[dtype],
        "logits_dtype": "float32",
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_seq_len,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_size": spec.head_dim,
        "intermediate_size": spec.ffn_hidden_size,
        "norm_epsilon": spec.norm_eps,
        "position_embedding_type": "rope_gpt_neox" if spec.position_embedding == "rope" else "learned_absolute",
        "rotary_base": spec.rope_base,
        "rotary_scaling": rotary_scaling,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        # lm_head is always written as its own tensor (needed when pp > 1), so the engine never ties it.
        "tie_word_embeddings": False,
        "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    if spec.family == "llama":
        config.update(hidden_act="silu", attn_bias=spec.bias, mlp_bias=spec.bias)
    elif spec.family == "mixtral":
        # The MoE layer needs the gated activation named explicitly; intermediate_size is per expert.
        config.update(hidden_act="swiglu", attn_bias=False, mlp_bias=False,
                      moe={"num_experts": spec.num_experts, "top_k": spec.moe_top_k,
                           "normalization_mode": RENORMALIZE})  # fmt: skip
        config["mapping"].update(moe_tp_size=tp // ep, moe_ep_size=ep)
    else:
        # The GPT class builds a gated MLP only when hidden_act names a gated activation.
        config.update(
            hidden_act="swiglu" if (spec.activation == "swiglu") else "gelu",
            bias=spec.bias,
            gpt_variant="gpt2",
            rotary_pct=1.0,
            apply_query_key_layer_scaling=False,
            q_scaling=1.0,
        )
    return config


def trt_names(entry: mapping.Entry, spec: ModelConfig, local_layer: int | None) -> tuple[str, ...]:
    names = entry.trt(local_layer)
    return (
        names if entry.param.trt_op != "fc1" or (spec.activation == "swiglu") else names[:1]
    )  # plain MLP: mlp.fc only


def kv_heads_per_rank(spec: ModelConfig, tp: int) -> int:
    return math.ceil(spec.num_kv_heads / tp)


def rank_shapes(entry: mapping.Entry, spec: ModelConfig, tp: int, ep: int = 1) -> list[tuple[int, ...]]:
    """Per-rank shape of each TensorRT-LLM tensor an entry becomes (a rank's stack of experts for expert rows)."""
    shape = mapping.canonical_shape(entry, spec)
    op = entry.param.trt_op
    if op in ("replicate", "router"):
        return [shape]
    if op in _EXPERT_OPS:
        local, inner = spec.num_experts // ep, spec.expert_ffn_hidden_size // (tp // ep)
        h = spec.hidden_size
        return [(local, 2 * inner, h) if op == "expert_fc1" else (local, h, inner)]
    if op == "row":
        return [(shape[0], shape[1] // tp)]
    if op == "qkv":
        rows = (spec.num_attention_heads // tp + 2 * kv_heads_per_rank(spec, tp)) * spec.head_dim
        return [(rows, *shape[1:])]
    if op == "fc1":
        parts = 2 if (spec.activation == "swiglu") else 1
        return [(spec.ffn_hidden_size // tp, *shape[1:])] * parts
    if op == "lm_head":
        return [(math.ceil(spec.vocab_size / tp), shape[1])]
    raise AssertionError(f"unknown trt_op {op!r}")


def shard(entry: mapping.Entry, tensor: torch.Tensor, spec: ModelConfig, tp: int) -> list[list[torch.Tensor]]:
    """[tp_rank][k]: the k-th TensorRT-LLM tensor of `entry` on each tensor-parallel rank."""
    op = entry.param.trt_op
    if op in ("replicate", "router"):
        return [[tensor] for _ in range(tp)]
    if op == "row":
        return [[t.contiguous()] for t in torch.chunk(tensor, tp, dim=1)]
    if op == "lm_head":
        rows = math.ceil(spec.vocab_size / tp)
        pieces = [tensor[r * rows : (r + 1) * rows] for r in range(tp)]
        return [[_pad_rows(p, rows)] for p in pieces]  # zero rows only where the vocabulary runs out
    if op == "fc1":
        parts = torch.split(tensor, mapping.split_sizes(entry, spec), dim=0)  # (gate, up) or (fc,)
        chunked = [torch.chunk(p, tp, dim=0) for p in parts]
        return [[c[r].contiguous() for c in chunked] for r in range(tp)]
    if op == "qkv":
        q, k, v = torch.split(tensor, mapping.split_sizes(entry, spec), dim=0)
        if spec.num_kv_heads < tp:
            # Each kv head is stored once per rank that uses it: rank r gets head r // (tp / num_kv_heads).
            repeat, d = tp // spec.num_kv_heads, spec.head_dim
            k, v = (x.reshape(spec.num_kv_heads, d, *x.shape[1:]).repeat_interleave(repeat, dim=0) for x in (k, v))
            k, v = (x.reshape(-1, *x.shape[2:]) for x in (k, v))
        qs, ks, vs = (torch.chunk(x, tp, dim=0) for x in (q, k, v))
        return [[_concat_rows([qs[r], ks[r], vs[r]])] for r in range(tp)]
    raise AssertionError(f"unknown trt_op {op!r}")


def _concat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    # Same as torch.cat(parts), which is several times slower for bf16 on some CPU builds.
    out = torch.empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype)
    start = 0
    for part in parts:
        out[start : start + part.shape[0]].copy_(part)
        start += part.shape[0]
    return out


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    return _concat_rows([tensor, torch.zeros((rows - tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype)])


def _stage_entries(spec: ModelConfig, pp: int) -> list[tuple[mapping.Entry, int, int | None]]:
    """(entry, pp_rank, local layer) for every tensor written; lm_head comes from embed.weight when tied."""
    per_stage = spec.num_layers // pp
    out = []
    for entry in mapping.entries(spec):
        stage = mapping.stage_of(entry.param)
        if stage == "layer":
            out.append((entry, entry.layer // per_stage, entry.layer % per_stage))
        else:
            out.append((entry, 0 if stage == "first" else pp - 1, None))
    if spec.tie_embeddings:
        head = next(p for p in mapping.TABLES[spec.family] if p.trt_op == "lm_head")
        out.append((mapping.Entry(head, None, "embed.weight", ()), pp - 1, None))
    return out


def trt_manifest(spec: ModelConfig, dtype: torch.dtype, tp: int, pp: int, ep: int = 1) -> dict[int, list]:
    """rank -> [(name, dtype, shape)] of every rank file (the router is float32, as TensorRT-LLM stores it)."""
    manifest: dict[int, list] = {r: [] for r in range(tp * pp)}
    for entry, pp_rank, local in _stage_entries(spec, pp):
        if entry.expert not in (None, 0):  # a rank's experts share one stacked tensor, listed once
            continue
        kind = torch.float32 if entry.param.trt_op == "router" else dtype
        for tp_rank in range(tp):
            names, shapes = trt_names(entry, spec, local), rank_shapes(entry, spec, tp, ep)
            manifest[pp_rank * tp + tp_rank] += [(n, kind, s) for n, s in zip(names, shapes, strict=True)]
    return manifest


def expert_pieces(entry: mapping.Entry, tensor: torch.Tensor, spec: ModelConfig, tp: int, ep: int):
    """(tp rank, slot in its stack, piece) for every tp rank holding a part of routed expert `entry.expert`.

    Expert e lives on the tp ranks t with t % ep == e // (E / ep), at slot e % (E / ep); rank t holds slice
    t // ep of the inner dimension: fc as [up slice; gate slice], proj as columns.
    """
    local = spec.num_experts // ep
    inner = spec.expert_ffn_hidden_size // (tp // ep)
    for tp_rank in range(tp):
        if tp_rank % ep != entry.expert // local:
            continue
        part = slice((tp_rank // ep) * inner, (tp_rank // ep + 1) * inner)
        if entry.param.trt_op == "expert_fc1":
            gate, up = torch.split(tensor, mapping.split_sizes(entry, spec), dim=0)
            piece = _concat_rows([up[part], gate[part]])
        else:
            piece = tensor[:, part].contiguous()
        yield tp_rank, entry.expert % local, piece


_ROW_OPS = ("replicate", "lm_head")


def _write_row_blocks(op: str, stream, files: list[SafetensorsWriter], name: str, spec: ModelConfig, tp: int) -> int:
    """Writes a vocabulary-sized tensor from row blocks: whole on every tp rank ("replicate"), or split into
    ceil(V / tp) rows per rank and zero-padded ("lm_head"). Returns the bytes written."""
    rows = math.ceil(spec.vocab_size / tp) if op == "lm_head" else spec.vocab_size
    nbytes, hidden, dtype = 0, None, None
    for start, block in stream:
        stop = start + block.shape[0]
        hidden, dtype = block.shape[1:], block.dtype
        for r, writer in enumerate(files):
            first = 0 if op == "replicate" else r * rows  # this rank's first global row
            lo, hi = max(start, first), min(stop, first + rows)
            if lo < hi:
                writer.write_rows(name, lo - first, block[lo - start : hi - start])
                nbytes += (hi - lo) * block[0].numel() * block.element_size()
    if op == "lm_head" and hidden is not None:
        for r, writer in enumerate(files):
            real = max(0, min(spec.vocab_size - r * rows, rows))
            if real < rows:  # zero rows where the vocabulary runs out
                writer.write_rows(name, real, torch.zeros((rows - real, *hidden), dtype=dtype))
    return nbytes


def export_trtllm(source: ModelSource, out: str | os.PathLike, *, tp: int = 1, pp: int = 1, ep: int = 1,
                  dtype: torch.dtype = torch.bfloat16, force: bool = False, progress: bool = True) -> Path:  # fmt: skip
    """Writes `source` as a TensorRT-LLM checkpoint for tp x pp ranks (experts over `ep` groups) in `out`."""
    spec = model_config_from_dict(source.model_config)
    check_trt_family(spec)
    check_parallel(spec, tp, pp, allow_kv_duplication=True)
    check_trt_experts(spec, tp, ep)
    check_source(source, spec)
    manifest = trt_manifest(spec, dtype, tp, pp, ep)
    bar = Progress(spec.num_layers + 2, enabled=progress)
    with atomic_output_dir(out, force, source_paths(source)) as tmp:
        writers = {r: SafetensorsWriter(tmp / f"rank{r}.safetensors", m) for r, m in manifest.items()}
        try:
            for entry, pp_rank, local in _stage_entries(spec, pp):
                stream = row_stream(source, entry, spec, dtype) if entry.param.trt_op in _ROW_OPS else None
                if stream is not None:  # an embedding / lm_head, in row blocks
                    (name,) = trt_names(entry, spec, local)
                    files = [writers[pp_rank * tp + r] for r in range(tp)]
                    nbytes = _write_row_blocks(entry.param.trt_op, stream, files, name, spec, tp)
                    bar.tensor(mapping.group_name(entry), name, nbytes)
                    continue
                if entry.param.trt_op in _EXPERT_OPS:
                    tensor = read_checked(source, entry, spec, dtype)
                    (name,) = trt_names(entry, spec, local)
                    for tp_rank, slot, piece in expert_pieces(entry, tensor, spec, tp, ep):
                        writers[pp_rank * tp + tp_rank].write_rows(name, slot, piece.unsqueeze(0))
                        bar.tensor(mapping.group_name(entry), name, piece.numel() * piece.element_size())
                    continue
                kind = torch.float32 if entry.param.trt_op == "router" else dtype
                tensor = read_checked(source, entry, spec, kind)
                for tp_rank, pieces in enumerate(shard(entry, tensor, spec, tp)):
                    for name, piece in zip(trt_names(entry, spec, local), pieces, strict=True):
                        writers[pp_rank * tp + tp_rank].write(name, piece)
                        bar.tensor(mapping.group_name(entry), name, piece.numel() * piece.element_size())
                del tensor
            for writer in writers.values():
                writer.close()
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        bar.close()
        (tmp / "config.json").write_text(json.dumps(trt_config(spec, dtype, tp, pp, ep), indent=2) + "\n")
    return Path(out)
