"""One declarative name-mapping table per model family: canonical <-> Hugging Face <-> TensorRT-LLM.

Each row names one canonical tensor, the Hugging Face tensor(s) it becomes and how (`hf_op`), the TensorRT-LLM
tensor(s) it becomes and how it is split over tensor-parallel ranks (`trt_op`), and when the row applies
(`when`). `{i}` is a layer index: global in canonical and Hugging Face names, stage-local in TensorRT-LLM names;
`{e}` is a routed expert (each its own canonical and Hugging Face tensor; TensorRT-LLM stacks a rank's experts).
Export walks the rows forward; import walks the same rows backwards, so the two cannot disagree.

hf_op:  copy | transpose (GPT-2 Conv1D stores [in, out]) | split_qkv (rows -> q, k, v) | split_gate_up (rows -> gate,
        up)
trt_op: replicate | column (split dim 0) | row (split dim 1; its bias is a separate `replicate` row) | qkv (q, k, v
        split separately, kv heads duplicated when fewer than tp) | fc1 (gated: gate -> mlp.fc, up -> mlp.gate, each
        split on dim 0; plain: column) | lm_head (rows zero-padded to a multiple of tp, then column) | router (the
        MoE router, float32, replicated) | expert_fc1 / expert_fc2 (slot e of the rank's stacked experts: see
        trtllm.py) | none (no TensorRT-LLM export for the family)
when:   always | bias (linear biases) | norm_bias (LayerNorm) | learned (learned positions) | untied (own output
        matrix; in TensorRT-LLM the lm_head is always written, from embed.weight when tied) | dense (a layer with a
        dense MLP) | moe (a mixture-of-experts layer) | qk_norm
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

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.canonical


def _expand(text: str) -> tuple[str, ...]:
    """'{M}mlp.[gate,up]_proj.weight' -> ('{M}mlp.gate_proj.weight', '{M}mlp.up_proj.weight')."""
    if "[" not in text:
        return (text,)
    head, rest = text.split("[", 1)
    choices, tail = rest.split("]", 1)
    return tuple(head + c.strip() + tail for c in choices.split(","))


HF_OPS = {"copy": 1, "transpose": 1, "split_qkv": 3, "split_gate_up": 2}  # op -> number of HF tensors
# op -> number of TRT names (fc1: fc, gate)
TRT_OPS = {"replicate": 1, "row": 1, "qkv": 1, "lm_head": 1, "fc1": 2, "router": 1, "expert_fc1": 1, "expert_fc2": 1,
           "none": 1}  # fmt: skip
WHEN = ("always", "bias", "norm_bias", "learned", "untied", "dense", "moe", "qk_norm")


def _table(text: str, **prefixes: str) -> tuple[Param, ...]:
    rows = []
    for line in text.strip().splitlines():
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split("|")]
        canonical, hf, hf_op, trt, trt_op = cells[:5]
        when = cells[5] if len(cells) > 5 else "always"
        row = Param(canonical, _expand(hf.format(i="{i}", e="{e}", **prefixes)), hf_op,
                    _expand(trt.format(i="{i}", e="{e}", **prefixes)), trt_op, when)  # fmt: skip
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

# The rows every Llama-like family shares (attention, norms, embeddings; Qwen3's qk-norm where configured).
_LLAMA_LIKE = """
embed.weight                | model.embed_tokens.weight          | copy      | transformer.vocab_embedding.weight | replicate
layers.{i}.attn_norm.weight | {M}input_layernorm.weight          | copy      | {L}input_layernorm.weight          | replicate
layers.{i}.attn.qkv.weight  | {M}self_attn.[q,k,v]_proj.weight   | split_qkv | {L}attention.qkv.weight            | qkv
layers.{i}.attn.q_norm.weight | {M}self_attn.q_norm.weight       | copy      | -                                  | none      | qk_norm
layers.{i}.attn.k_norm.weight | {M}self_attn.k_norm.weight       | copy      | -                                  | none      | qk_norm
layers.{i}.attn.proj.weight | {M}self_attn.o_proj.weight         | copy      | {L}attention.dense.weight          | row
layers.{i}.mlp_norm.weight  | {M}post_attention_layernorm.weight | copy      | {L}post_layernorm.weight           | replicate
final_norm.weight           | model.norm.weight                  | copy      | transformer.ln_f.weight            | replicate
output.weight               | lm_head.weight                     | copy      | lm_head.weight                     | lm_head   | untied
"""

_DENSE_MLP = """
layers.{i}.mlp.fc1.weight   | {M}mlp.[gate,up]_proj.weight       | split_gate_up | {L}mlp.[fc,gate].weight        | fc1       | dense
layers.{i}.mlp.fc2.weight   | {M}mlp.down_proj.weight            | copy          | {L}mlp.proj.weight             | row       | dense
"""

# Mixtral: experts' w1 = gate (activated), w3 = up, w2 = down; `gate` is the router.
MIXTRAL_TABLE = _table(
    _LLAMA_LIKE
    + """
layers.{i}.mlp.router.weight          | {M}block_sparse_moe.gate.weight                | copy          | {L}mlp.router.weight | router     | moe
layers.{i}.mlp.experts.{e}.fc1.weight | {M}block_sparse_moe.experts.{e}.[w1,w3].weight | split_gate_up | {L}mlp.fc.weight     | expert_fc1 | moe
layers.{i}.mlp.experts.{e}.fc2.weight | {M}block_sparse_moe.experts.{e}.w2.weight     | copy          | {L}mlp.proj.weight   | expert_fc2 | moe
""",
    **_PREFIXES,
)

QWEN3_TABLE = _table(_LLAMA_LIKE + _DENSE_MLP, **_PREFIXES)

# Qwen3-MoE: `mlp.gate` is the router; layers in mlp_only_layers keep a dense MLP.
QWEN3_MOE_TABLE = _table(
    _LLAMA_LIKE
    + _DENSE_MLP
    + """
layers.{i}.mlp.router.weight          | {M}mlp.gate.weight                         | copy          | {L}mlp.router.weight | router     | moe
layers.{i}.mlp.experts.{e}.fc1.weight | {M}mlp.experts.{e}.[gate,up]_proj.weight   | split_gate_up | {L}mlp.fc.weight     | expert_fc1 | moe
layers.{i}.mlp.experts.{e}.fc2.weight | {M}mlp.experts.{e}.down_proj.weight        | copy          | {L}mlp.proj.weight   | expert_fc2 | moe
""",
    **_PREFIXES,
)

TABLES = {
    "gpt": GPT2_TABLE,
    "llama": LLAMA_TABLE,
    "mixtral": MIXTRAL_TABLE,
    "qwen3": QWEN3_TABLE,
    "qwen3_moe": QWEN3_MOE_TABLE,
}


def applies(when: str, spec: ModelConfig, layer: int | None = None) -> bool:
    """Whether a row with condition `when` exists in `spec` (in layer `layer`, for the per-layer conditions)."""
    return {
        "always": True,
        "bias": spec.bias,
        "norm_bias": (spec.norm == "layernorm"),
        "learned": (spec.position_embedding == "learned"),
        "untied": not spec.tie_embeddings,
        "dense": layer is not None and not spec.is_moe_layer(layer),
        "moe": layer is not None and spec.is_moe_layer(layer),
        "qk_norm": spec.qk_norm,
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
    """One row of a table made concrete for one layer (or none), and one routed expert for per-expert rows."""

    param: Param
    layer: int | None
    canonical: str
    hf: tuple[str, ...]
    expert: int | None = None

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
            if not applies(p.when, spec, i):
                continue
            for e in range(spec.num_experts) if p.per_expert else [None]:
                out.append(Entry(p, i, p.canonical.format(i=i, e=e), tuple(n.format(i=i, e=e) for n in p.hf), e))
    out += [Entry(p, None, p.canonical, p.hf) for p in post if applies(p.when, spec)]
    return out


MAX_MISSING = 10_000
"""How many more tensors than an input holds a config may imply before it is refused without listing them."""


def num_tensors(spec: ModelConfig, side: str = "canonical") -> int:
    """How many canonical ("canonical"), Hugging Face ("hf") or per-rank TensorRT-LLM ("trt": a rank's experts are
    one stacked tensor) tensors the model has, counted without listing them."""
    table = TABLES[spec.family]
    total = 0
    for param in table:
        if stage_of(param) != "layer":
            total += (len(param.hf) if side == "hf" else 1) if applies(param.when, spec) else 0
            continue
        if param.when in ("dense", "moe"):
            layers = sum(applies(param.when, spec, i) for i in range(min(spec.num_layers, MAX_MISSING)))
            layers = layers if spec.num_layers <= MAX_MISSING else spec.num_layers  # a bound is all that is needed
        else:
            layers = spec.num_layers if applies(param.when, spec) else 0
        per_layer = len(param.hf) if side == "hf" else 1
        experts = spec.num_experts if param.per_expert and side != "trt" else 1
        total += layers * per_layer * experts
    return total


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
    fe = spec.expert_ffn_hidden_size
    qkv = (spec.num_attention_heads + 2 * spec.num_kv_heads) * d
    gated = spec.activation == "swiglu"
    fc1 = 2 * f if gated else f
    name = entry.param.canonical
    shapes = {
        "embed.weight": (v, h),
        "pos_embed.weight": (spec.max_seq_len, h),
        "layers.{i}.attn.qkv.weight": (qkv, h),
        "layers.{i}.attn.qkv.bias": (qkv,),
        "layers.{i}.attn.q_norm.weight": (d,),
        "layers.{i}.attn.k_norm.weight": (d,),
        "layers.{i}.attn.proj.weight": (h, spec.num_attention_heads * d),
        "layers.{i}.mlp.fc1.weight": (fc1, h),
        "layers.{i}.mlp.fc1.bias": (fc1,),
        "layers.{i}.mlp.fc2.weight": (h, f),
        "layers.{i}.mlp.router.weight": (spec.num_experts, h),
        "layers.{i}.mlp.experts.{e}.fc1.weight": (2 * fe if gated else fe, h),
        "layers.{i}.mlp.experts.{e}.fc2.weight": (h, fe),
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
    if name == "layers.{i}.mlp.experts.{e}.fc1.weight" and spec.activation == "swiglu":
        return [spec.expert_ffn_hidden_size, spec.expert_ffn_hidden_size]
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


_HF_NAMES = {"gpt": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
             "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}  # fmt: skip


def _fail(spec: ModelConfig, what: str) -> ConversionError:
    return ConversionError(f"{_HF_NAMES[spec.family]} {what}")


def check_family_fits_hf(spec: ModelConfig) -> None:
    """Each Hugging Face class can express only its own architecture; raises naming what does not fit."""
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
    moe_family = spec.family in ("mixtral", "qwen3_moe")
    if moe_family != (spec.num_experts > 0):
        what = "needs routed experts (num_experts > 0)" if moe_family else "has no routed experts"
        hint = "" if moe_family else "; set family to 'mixtral' or 'qwen3_moe'"
        raise _fail(spec, f"{what}, the model config has num_experts = {spec.num_experts}{hint}")
    if spec.qk_norm != spec.family.startswith("qwen3"):
        state = "always has" if spec.family.startswith("qwen3") else "has no"
        raise _fail(spec, f"{state} qk-norm, the model config has qk_norm = {spec.qk_norm}")
    if spec.family in ("gpt", "llama"):
        if spec.kv_channels is not None and spec.kv_channels * spec.num_attention_heads != spec.hidden_size:
            raise _fail(spec, f"needs head_dim = hidden_size / heads, the model config has kv_channels "
                              f"{spec.kv_channels}")  # fmt: skip
        return
    if spec.bias:
        raise _fail(spec, "has no MLP biases, but the model config has bias = True")
    if not moe_family:
        return
    if spec.moe_shared_expert_ffn_hidden_size is not None or spec.moe_expert_bias:
        raise _fail(spec, "has no shared expert and no expert bias")
    if spec.moe_score_function != "softmax":
        raise _fail(spec, f"routes with a softmax, the model config has moe_score_function = "
                          f"{spec.moe_score_function!r}")  # fmt: skip
    if spec.family == "mixtral":
        if not spec.moe_norm_topk_prob or spec.num_moe_layers != spec.num_layers:
            raise _fail(spec, "renormalises the top-k weights (moe_norm_topk_prob = true) in every layer "
                              "(moe_layer_freq = 1)")  # fmt: skip
        if spec.expert_ffn_hidden_size != spec.ffn_hidden_size:
            raise _fail(spec, f"has one intermediate_size: moe_ffn_hidden_size ({spec.expert_ffn_hidden_size}) != "
                              f"ffn_hidden_size ({spec.ffn_hidden_size})")  # fmt: skip
