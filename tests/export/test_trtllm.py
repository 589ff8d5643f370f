"""TensorRT-LLM export at tp in {1, 2, 4} and pp in {1, 2}: reassembling the rank files gives back every tensor."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from megalith.export.spec import ConversionError
from megalith.export.trtllm import export_trtllm
from tests.export.common import CONFIGS, DictSource, random_tensors


def _layer_names(cfg: dict, j: int) -> set[str]:
    p = f"transformer.layers.{j}."
    names = {p + n for n in ("input_layernorm.weight", "attention.qkv.weight", "attention.dense.weight",
                             "post_layernorm.weight", "mlp.fc.weight", "mlp.proj.weight")}  # fmt: skip
    if cfg["activation"] == "swiglu":
        names.add(p + "mlp.gate.weight")
    if cfg["norm"] == "layernorm":
        names |= {p + "input_layernorm.bias", p + "post_layernorm.bias"}
    if cfg["bias"]:
        names |= {p + "attention.qkv.bias", p + "attention.dense.bias", p + "mlp.fc.bias", p + "mlp.proj.bias"}
        if cfg["activation"] == "swiglu":
            names.add(p + "mlp.gate.bias")
    return names


def _reassemble(cfg: dict, out, tp: int, pp: int, dtype) -> dict[str, torch.Tensor]:
    """Canonical tensors rebuilt from the rank files by the published layout, checking each rank on the way."""
    v, h, f = cfg["vocab_size"], cfg["hidden_size"], cfg["ffn_hidden_size"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_kv_heads"]
    d, per_stage = h // nq, cfg["num_layers"] // pp
    kv_local = math.ceil(nkv / tp)
    ranks = {(p, t): load_file(out / f"rank{p * tp + t}.safetensors") for p in range(pp) for t in range(tp)}
    assert sorted(x.name for x in out.glob("rank*.safetensors")) == sorted(
        f"rank{r}.safetensors" for r in range(tp * pp)
    )
    for (p, t), files in ranks.items():
        expected = set().union(*(_layer_names(cfg, j) for j in range(per_stage)))
        if p == 0:
            expected.add("transformer.vocab_embedding.weight")
            if cfg["position_embedding"] == "learned":
                expected.add("transformer.position_embedding.weight")
        if p == pp - 1:
            expected |= {"transformer.ln_f.weight", "lm_head.weight"}
            if cfg["norm"] == "layernorm":
                expected.add("transformer.ln_f.bias")
        assert set(files) == expected, (p, t)
        assert all(x.dtype == dtype for x in files.values())

    def same_on_all(p, name):
        first = ranks[(p, 0)][name]
        assert all(torch.equal(ranks[(p, t)][name], first) for t in range(tp)), name
        return first

    out_t = {"embed.weight": same_on_all(0, "transformer.vocab_embedding.weight")}
    if cfg["position_embedding"] == "learned":
        out_t["pos_embed.weight"] = same_on_all(0, "transformer.position_embedding.weight")
    for i in range(cfg["num_layers"]):
        p, j = divmod(i, per_stage)
        s, c = f"transformer.layers.{j}.", f"layers.{i}."
        rank = [ranks[(p, t)] for t in range(tp)]

        def split_qkv(key, rank=rank, s=s):
            per = [r[s + key] for r in rank]
            assert all(x.shape[0] == (nq // tp + 2 * kv_local) * d for x in per)
            q = torch.cat([x[: nq // tp * d] for x in per])
            ks = [x[nq // tp * d : (nq // tp + kv_local) * d] for x in per]
            vs = [x[(nq // tp + kv_local) * d :] for x in per]
            if nkv >= tp:
                return torch.cat([q, torch.cat(ks), torch.cat(vs)])
            group = tp // nkv  # ranks r*group .. (r+1)*group-1 all hold kv head r
            for t in range(tp):
                assert torch.equal(ks[t], ks[t // group * group]) and torch.equal(vs[t], vs[t // group * group])
            return torch.cat([q, *ks[::group], *vs[::group]])

        out_t[c + "attn_norm.weight"] = same_on_all(p, s + "input_layernorm.weight")
        out_t[c + "mlp_norm.weight"] = same_on_all(p, s + "post_layernorm.weight")
        out_t[c + "attn.qkv.weight"] = split_qkv("attention.qkv.weight")
        out_t[c + "attn.proj.weight"] = torch.cat([r[s + "attention.dense.weight"] for r in rank], dim=1)
        out_t[c + "mlp.fc2.weight"] = torch.cat([r[s + "mlp.proj.weight"] for r in rank], dim=1)
        fc = torch.cat([r[s + "mlp.fc.weight"] for r in rank])
        gated = cfg["activation"] == "swiglu"
        out_t[c + "mlp.fc1.weight"] = (
            torch.cat([fc, torch.cat([r[s + "mlp.gate.weight"] for r in rank])]) if gated else fc
        )
        assert fc.shape[0] == f
        if cfg["norm"] == "layernorm":
            out_t[c + "attn_norm.bias"] = same_on_all(p, s + "input_layernorm.bias")
            out_t[c + "mlp_norm.bias"] = same_on_all(p, s + "post_layernorm.bias")
        if cfg["bias"]:
            out_t[c + "attn.qkv.bias"] = split_qkv("attention.qkv.bias")
            out_t[c + "attn.proj.bias"] = same_on_all(p, s + "attention.dense.bias")
            out_t[c + "mlp.fc2.bias"] = same_on_all(p, s + "mlp.proj.bias")
            fcb = torch.cat([r[s + "mlp.fc.bias"] for r in rank])
            out_t[c + "mlp.fc1.bias"] = (
                torch.cat([fcb, torch.cat([r[s + "mlp.gate.bias"] for r in rank])]) if gated else fcb
            )
    last = [ranks[(pp - 1, t)] for t in range(tp)]
    out_t["final_norm.weight"] = same_on_all(pp - 1, "transformer.ln_f.weight")
    if cfg["norm"] == "layernorm":
        out_t["final_norm.bias"] = same_on_all(pp - 1, "transformer.ln_f.bias")
    head = torch.cat([r["lm_head.weight"] for r in last])
    assert all(r["lm_head.weight"].shape == (math.ceil(v / tp), h) for r in last)
    assert head.shape[0] % tp == 0 and torch.count_nonzero(head[v:]) == 0
    out_t["output.weight"] = head[:v]
    return out_t


@pytest.mark.parametrize("name", ["gpt_untied", "llama_gqa", "llama_mqa_tied"])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("pp", [1, 2])
def test_rank_files_reassemble_to_the_canonical_tensors(name, tp, pp, tmp_path):
    cfg = CONFIGS[name]
    tensors = random_tensors(cfg, seed=tp * 10 + pp)
    dtype = torch.float32 if tp != 2 else torch.bfloat16
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    out = export_trtllm(DictSource(cfg, tensors), tmp_path / "trt", tp=tp, pp=pp, dtype=dtype, progress=False)
    back = _reassemble(cfg, out, tp, pp, dtype)
    expected = dict(tensors)
    if cfg["tie_embeddings"]:
        expected["output.weight"] = tensors["embed.weight"]
    assert sorted(back) == sorted(expected)
    for key, original in expected.items():
        assert torch.equal(back[key], original.to(dtype)), (key, dtype_name)

    config = json.loads((out / "config.json").read_text())
    llama = cfg["family"] == "llama"
    want = {
        "architecture": "LlamaForCausalLM" if llama else "GPTForCausalLM",
        "dtype": {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype],
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "num_hidden_layers": cfg["num_layers"],
        "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg["num_kv_heads"],
        "head_size": cfg["hidden_size"] // cfg["num_attention_heads"],
        "intermediate_size": cfg["ffn_hidden_size"],
        "max_position_embeddings": cfg["max_seq_len"],
        "norm_epsilon": cfg["norm_eps"],
        "hidden_act": "silu" if llama else "gelu",
        "position_embedding_type": "rope_gpt_neox" if llama else "learned_absolute",
        "rotary_base": cfg["rope_base"],
        "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp},
    }
    assert {k: config.get(k) for k in want} == want
    if llama:
        assert config["attn_bias"] == config["mlp_bias"] == cfg["bias"]
        scaling = cfg["rope_scaling"]
        assert config["rotary_scaling"] == (
            None if scaling is None else {"type": "llama3", "rope_type": "llama3", **scaling}
        )
    else:
        assert config["bias"] is True


def test_hand_checked_kv_duplication_slices(tmp_path):
    """llama_mqa_tied at tp=4: one kv head copied to all four ranks; each rank holds one q head."""
    cfg = CONFIGS["llama_mqa_tied"]
    tensors = random_tensors(cfg)
    out = export_trtllm(DictSource(cfg, tensors), tmp_path / "trt", tp=4, dtype=torch.float32, progress=False)
    qkv = tensors["layers.1.attn.qkv.weight"]  # rows: q heads 0..3 (8 rows each), k (8), v (8)
    for r in range(4):
        got = load_file(out / f"rank{r}.safetensors")["transformer.layers.1.attention.qkv.weight"]
        assert got.shape == (24, 32)
        assert torch.equal(got, torch.cat([qkv[8 * r : 8 * r + 8], qkv[32:40], qkv[40:48]]))
        up_rows = load_file(out / f"rank{r}.safetensors")["transformer.layers.0.mlp.gate.weight"]
        assert torch.equal(up_rows, tensors["layers.0.mlp.fc1.weight"][64 + 16 * r : 64 + 16 * (r + 1)])


def test_bad_layouts_are_refused_with_the_values(tmp_path):
    cfg = CONFIGS["llama_gqa"]  # 8 heads, 2 kv heads, 4 layers, ffn 96
    src = DictSource(cfg, random_tensors(cfg))
    with pytest.raises(ConversionError, match=r"num_attention_heads \(8\) is not divisible by tp \(3\)"):
        export_trtllm(src, tmp_path / "a", tp=3, progress=False)
    with pytest.raises(ConversionError, match=r"num_layers \(4\) is not divisible by pp \(3\)"):
        export_trtllm(src, tmp_path / "b", pp=3, progress=False)
    odd = dict(cfg, num_attention_heads=12, hidden_size=96, num_kv_heads=3)
    with pytest.raises(ConversionError, match=r"num_kv_heads \(3\) must be divisible by tp \(4\) or a divisor"):
        export_trtllm(DictSource(odd, random_tensors(odd)), tmp_path / "c", tp=4, progress=False)
    rms_gpt = dict(CONFIGS["gpt_untied"], norm="rmsnorm")
    with pytest.raises(ConversionError, match="needs norm = 'layernorm'"):
        export_trtllm(DictSource(rms_gpt, {}), tmp_path / "d", progress=False)
    assert not any(tmp_path.iterdir())
