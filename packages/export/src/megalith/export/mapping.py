"""One declarative name-mapping table per model family: canonical <-> Hugging Face <-> TensorRT-LLM.

Each row names one canonical tensor, the Hugging Face tensor(s) it becomes and how (`hf_op`), the TensorRT-LLM
tensor(s) it becomes and how it is split over tensor-parallel ranks (`trt_op`), and when the row applies
(`when`). `{i}` is a layer index: global in canonical and Hugging Face names, stage-local in TensorRT-LLM names.
Export walks the rows forward; import walks the same rows backwards, so the two cannot disagree.

hf_op:  copy | transpose (GPT-2 Conv1D stores [in, out]) | split_qkv (rows -> q, k, v) | split_gate_up (rows -> gate,
        up)
trt_op: replicate | column (split dim 0) | row (split dim 1; its bias is a separate `replicate` row) | qkv (q, k, v
        split separately, kv heads duplicated when fewer than tp) | fc1 (gated: gate -> mlp.fc, up -> mlp.gate, each
        split on dim 0; plain: column) | lm_head (rows zero-padded to a multiple of tp, then column)
when:   always | bias (linear biases) | norm_bias (LayerNorm) | learned (learned positions) | untied (own output
        matrix; in TensorRT-LLM the lm_head is always written, from embed.weight when tied)
"""

# ruff: noqa: E501  (the tables below are one row per tensor; wrapping them would hide the columns)

from __future__ import annotations

from dataclasses import dataclass

from megalith.core.config import ModelConfig
from megalith.export.spec import ConversionError


@dataclass(frozen=True)
class Param:
    canonical: str
    hf: tuple[str, ...]
    hf_op: str
    trt: tuple[str, ...]
    trt_op: str
    when: str = "always"


def _expand(text: str) -> tuple[str, ...]:
    """'{M}mlp.[gate,up]_proj.weight' -> ('{M}mlp.gate_proj.weight', '{M}mlp.up_proj.weight')."""
    if "[" not in text:
        return (text,)
    head, rest = text.split("[", 1)
    choices, tail = rest.split("]", 1)
    return tuple(head + c.strip() + tail for c in choices.split(","))


HF_OPS = {"copy": 1, "transpose": 1, "split_qkv": 3, "split_gate_up": 2}  # op -> number of HF tensors
TRT_OPS = {"replicate": 1, "row": 1, "qkv": 1, "lm_head": 1, "fc1": 2}  # op -> number of TRT names (fc1: fc, gate)
WHEN = ("always", "bias", "norm_bias", "learned", "untied")


def _table(text: str, **prefixes: str) -> tuple[Param, ...]:
    rows = []
    for line in text.strip().splitlines():
        cells = [c.strip() for c in line.split("|")]
        canonical, hf, hf_op, trt, trt_op = cells[:5]
        when = cells[5] if len(cells) > 5 else "always"
        row = Param(canonical, _expand(hf.format(i="{i}", **prefixes)), hf_op,
                    _expand(trt.format(i="{i}", **prefixes)), trt_op, when)  # fmt: skip
        if HF_OPS.get(hf_op) != len(row.hf) or TRT_OPS.get(trt_op) != len(row.trt) or when not in WHEN:
            raise AssertionError(f"malformed mapping row: {line!r}")
        rows.append(row)
    return tuple(rows)


# {L}: TensorRT-LLM layer prefix (stage-local index); {G}: Hugging Face GPT-2; {M}: Hugging Face Llama.
_PREFIXES = {"L": "transformer.layers.{i}.", "G": "transformer.h.{i}.", "M": "model.layers.{i}."}

GPT2_TABLE = _table(
    """
embed.weight                | transformer.wte.weight  | copy      | transformer.vocab_embedding.weight    | replicate
pos_embed.weight            | transformer.wpe.weight  | copy      | transformer.position_embedding.weight | replicate | learned
layers.{i}.attn_norm.weight | {G}ln_1.weight          | copy      | {L}input_layernorm.weight             | replicate
layers.{i}.attn_norm.bias   | {G}ln_1.bias            | copy      | {L}input_layernorm.bias               | replicate | norm_bias
layers.{i}.attn.qkv.weight  | {G}attn.c_attn.weight   | transpose | {L}attention.qkv.weight               | qkv
layers.{i}.attn.qkv.bias    | {G}attn.c_attn.bias     | copy      | {L}attention.qkv.bias                 | qkv       | bias
layers.{i}.attn.proj.weight | {G}attn.c_proj.weight   | transpose | {L}attention.dense.weight             | row
layers.{i}.attn.proj.bias   | {G}attn.c_proj.bias     | copy      | {L}attention.dense.bias               | replicate | bias
layers.{i}.mlp_norm.weight  | {G}ln_2.weight          | copy      | {L}post_layernorm.weight              | replicate
layers.{i}.mlp_norm.bias    | {G}ln_2.bias            | copy      | {L}post_layernorm.bias                | replicate | norm_bias
layers.{i}.mlp.fc1.weight   | {G}mlp.c_fc.weight      | transpose | {L}mlp.[fc,gate].weight               | fc1
layers.{i}.mlp.fc1.bias     | {G}mlp.c_fc.bias        | copy      | {L}mlp.[fc,gate].bias                 | fc1       | bias
layers.{i}.mlp.fc2.weight   | {G}mlp.c_proj.weight    | transpose | {L}mlp.proj.weight                    | row
layers.{i}.mlp.fc2.bias     | {G}mlp.c_proj.bias      | copy      | {L}mlp.proj.bias                      | replicate | bias
final_norm.weight           | transformer.ln_f.weight | copy      | transformer.ln_f.weight               | replicate
final_norm.bias             | transformer.ln_f.bias   | copy      | transformer.ln_f.bias                 | replicate | norm_bias
output.weight               | lm_head.weight          | copy      | lm_head.weight                        | lm_head   | untied
""",
    **_PREFIXES,
)

LLAMA_TABLE = _table(
    """
embed.weight                | model.embed_tokens.weight          | copy          | transformer.vocab_embedding.weight | replicate
layers.{i}.attn_norm.weight | {M}input_layernorm.weight          | copy          | {L}input_layernorm.weight          | replicate
layers.{i}.attn.qkv.weight  | {M}self_attn.[q,k,v]_proj.weight   | split_qkv     | {L}attention.qkv.weight            | qkv
layers.{i}.attn.qkv.bias    | {M}self_attn.[q,k,v]_proj.bias     | split_qkv     | {L}attention.qkv.bias              | qkv       | bias
layers.{i}.attn.proj.weight | {M}self_attn.o_proj.weight         | copy          | {L}attention.dense.weight          | row
layers.{i}.attn.proj.bias   | {M}self_attn.o_proj.bias           | copy          | {L}attention.dense.bias            | replicate | bias
layers.{i}.mlp_norm.weight  | {M}post_attention_layernorm.weight | copy          | {L}post_layernorm.weight           | replicate
layers.{i}.mlp.fc1.weight   | {M}mlp.[gate,up]_proj.weight       | split_gate_up | {L}mlp.[fc,gate].weight            | fc1
layers.{i}.mlp.fc1.bias     | {M}mlp.[gate,up]_proj.bias         | split_gate_up | {L}mlp.[fc,gate].bias              | fc1       | bias
layers.{i}.mlp.fc2.weight   | {M}mlp.down_proj.weight            | copy          | {L}mlp.proj.weight                 | row
layers.{i}.mlp.fc2.bias     | {M}mlp.down_proj.bias              | copy          | {L}mlp.proj.bias                   | replicate | bias
final_norm.weight           | model.norm.weight                  | copy          | transformer.ln_f.weight            | replicate
output.weight               | lm_head.weight                     | copy          | lm_head.weight                     | lm_head   | untied
""",
    **_PREFIXES,
)

TABLES = {"gpt": GPT2_TABLE, "llama": LLAMA_TABLE}


def applies(when: str, spec: ModelConfig) -> bool:
    return {
        "always": True,
        "bias": spec.bias,
        "norm_bias": (spec.norm == "layernorm"),
        "learned": (spec.position_embedding == "learned"),
        "untied": not spec.tie_embeddings,
    }[when]


def is_layer_param(param: Param) -> bool:
    return "{i}" in param.canonical


def stage_of(param: Param) -> str:
    """'first' (embeddings), 'layer' or 'last' (final norm, output) pipeline stage."""
    if is_layer_param(param):
        return "layer"
    return "first" if param.canonical.startswith(("embed.", "pos_embed.")) else "last"


@dataclass(frozen=True)
class Entry:
    """One row of a table made concrete for one layer (or none)."""

    param: Param
    layer: int | None
    canonical: str
    hf: tuple[str, ...]

    def trt(self, local_layer: int | None) -> tuple[str, ...]:
        return tuple(n.format(i=local_layer) for n in self.param.trt)


def group_name(entry: Entry) -> str:
    if entry.layer is not None:
        return f"layer {entry.layer}"
    return "embeddings" if stage_of(entry.param) == "first" else "head"


def entries(spec: ModelConfig) -> list[Entry]:
    """Every canonical tensor of the model, in order: embeddings, layers 0..L-1, final norm, output."""
    table = TABLES[spec.family]
    pre = [p for p in table if stage_of(p) == "first"]
    layer = [p for p in table if stage_of(p) == "layer"]
    post = [p for p in table if stage_of(p) == "last"]
    out = [Entry(p, None, p.canonical, p.hf) for p in pre if applies(p.when, spec)]
    for i in range(spec.num_layers):
        for p in layer:
            if applies(p.when, spec):
                out.append(Entry(p, i, p.canonical.format(i=i), tuple(n.format(i=i) for n in p.hf)))
    out += [Entry(p, None, p.canonical, p.hf) for p in post if applies(p.when, spec)]
    return out


MAX_MISSING = 10_000
"""How many more tensors than an input holds a config may imply before it is refused without listing them."""


def num_tensors(spec: ModelConfig, side: str = "canonical") -> int:
    """How many canonical ("canonical") or Hugging Face ("hf") tensors the model has, counted without listing them."""
    counts = {"first": 0, "layer": 0, "last": 0}
    for param in TABLES[spec.family]:
        if applies(param.when, spec):
            counts[stage_of(param)] += len(param.hf) if side == "hf" else 1
    return counts["first"] + spec.num_layers * counts["layer"] + counts["last"]


def check_tensor_count(
    spec: ModelConfig, available: int, where: object, *, side: str = "canonical", tp: int = 1
) -> None:
    """Refuses a config implying far more tensors than the input holds, before any list of names is built.

    A hostile num_layers (or TensorRT-LLM tp) would otherwise make the lists of expected tensors unbounded; within
    MAX_MISSING of the input, the missing tensors are listed by name as usual.
    """
    needed = num_tensors(spec, side) * tp
    if needed > available + MAX_MISSING:
        detail = f"{spec.num_layers} layers" + (f", tp {tp}" if tp > 1 else "")
        raise ConversionError(
            f"{where}: the config implies at least {needed} tensors ({detail}), but only {available} are stored"
        )


def canonical_shape(entry: Entry, spec: ModelConfig) -> tuple[int, ...]:
    """Shape of a canonical tensor (CONTRACT: canonical parameter names and shapes)."""
    h, d, f, v = spec.hidden_size, spec.head_dim, spec.ffn_hidden_size, spec.vocab_size
    qkv = (spec.num_attention_heads + 2 * spec.num_kv_heads) * d
    fc1 = 2 * f if (spec.activation == "swiglu") else f
    name = entry.param.canonical
    shapes = {
        "embed.weight": (v, h),
        "pos_embed.weight": (spec.max_seq_len, h),
        "layers.{i}.attn.qkv.weight": (qkv, h),
        "layers.{i}.attn.qkv.bias": (qkv,),
        "layers.{i}.attn.proj.weight": (h, spec.num_attention_heads * d),
        "layers.{i}.mlp.fc1.weight": (fc1, h),
        "layers.{i}.mlp.fc1.bias": (fc1,),
        "layers.{i}.mlp.fc2.weight": (h, f),
        "output.weight": (v, h),
    }
    return shapes.get(name, (h,))  # norm weights/biases and the [H] biases of proj/fc2


def split_sizes(entry: Entry, spec: ModelConfig) -> list[int]:
    """Row counts of the parts a fused canonical tensor is made of (q, k, v or gate, up); one part if not fused."""
    name = entry.param.canonical
    if name.startswith("layers.{i}.attn.qkv"):
        d = spec.head_dim
        return [spec.num_attention_heads * d, spec.num_kv_heads * d, spec.num_kv_heads * d]
    if name.startswith("layers.{i}.mlp.fc1") and (spec.activation == "swiglu"):
        return [spec.ffn_hidden_size, spec.ffn_hidden_size]
    return [canonical_shape(entry, spec)[0]]


def hf_shapes(entry: Entry, spec: ModelConfig) -> list[tuple[int, ...]]:
    shape = canonical_shape(entry, spec)
    op = entry.param.hf_op
    if op == "copy":
        return [shape]
    if op == "transpose":
        return [tuple(reversed(shape))]
    if op in ("split_qkv", "split_gate_up"):
        return [(rows, *shape[1:]) for rows in split_sizes(entry, spec)]
    raise AssertionError(f"unknown hf_op {op!r}")


def check_family_fits_hf(spec: ModelConfig) -> None:
    """Hugging Face GPT2LMHeadModel / LlamaForCausalLM can express only their own architecture."""
    if spec.family == "gpt":
        wanted = {"norm": "layernorm", "activation": "gelu", "position_embedding": "learned"}
        if spec.num_kv_heads != spec.num_attention_heads:
            raise ConversionError(
                f"GPT2LMHeadModel has no grouped-query attention: num_kv_heads ({spec.num_kv_heads}) != "
                f"num_attention_heads ({spec.num_attention_heads})"
            )
        if not spec.bias:
            raise ConversionError("GPT2LMHeadModel always has linear biases, but the model config has bias = False")
    else:
        wanted = {"norm": "rmsnorm", "activation": "swiglu", "position_embedding": "rope"}
    for key, value in wanted.items():
        if getattr(spec, key) != value:
            raise ConversionError(
                f"a {spec.family!r} model exported to Hugging Face needs {key} = {value!r}, the config has "
                f"{getattr(spec, key)!r}"
            )
