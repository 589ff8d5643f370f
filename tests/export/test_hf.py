"""Hugging Face export (loaded by transformers, logits vs a float64 reference) and import (bit-exact round trip)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megalith.core import ModelConfig
from megalith.export.hf import HFModelSource, export_hf
from megalith.export.spec import ConversionError
from tests.export.common import CONFIGS, DictSource, random_tensors, reference_logits

transformers = pytest.importorskip("transformers")


def _hf_logits(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(ids).logits.double()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_logits_match_reference_and_import_round_trips(name, tmp_path):
    cfg = CONFIGS[name]
    tensors = random_tensors(cfg, seed=1)
    out = export_hf(DictSource(cfg, tensors), tmp_path / "hf", dtype=torch.float32, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [{"gpt": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[cfg["family"]]]
    assert config["tie_word_embeddings"] == cfg["tie_embeddings"]
    ids = torch.randint(0, cfg["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    expected = reference_logits(cfg, tensors, ids)
    got = _hf_logits(out, ids)
    assert got.shape == expected.shape
    err = (got - expected).abs().max().item()
    assert err < 1e-4 * expected.abs().max().item(), f"max |logit error| {err}"

    source = HFModelSource(out)
    assert {k: source.model_config[k] for k in cfg} == cfg
    assert ModelConfig.from_dict(source.model_config) == ModelConfig(**cfg)  # every other field at its default
    assert sorted(source.tensor_names()) == sorted(tensors)
    for tensor_name, original in tensors.items():
        back = source.read(tensor_name)
        assert back.dtype == original.dtype and torch.equal(back, original), tensor_name


def test_llama_layout_on_disk(tmp_path):
    """Names and [out, in] layouts HF expects: q/k/v split by rows, gate first, no lm_head when tied."""
    cfg = CONFIGS["llama_mqa_tied"]
    tensors = random_tensors(cfg, seed=2)
    export_hf(DictSource(cfg, tensors), tmp_path / "hf", dtype=torch.float32, progress=False)
    files = load_file(tmp_path / "hf" / "model.safetensors")
    assert "lm_head.weight" not in files
    qkv, d = tensors["layers.1.attn.qkv.weight"], 32 // 4
    assert torch.equal(files["model.layers.1.self_attn.q_proj.weight"], qkv[: 4 * d])
    assert torch.equal(files["model.layers.1.self_attn.k_proj.weight"], qkv[4 * d : 5 * d])
    assert torch.equal(files["model.layers.1.self_attn.v_proj.weight"], qkv[5 * d :])
    fc1 = tensors["layers.0.mlp.fc1.weight"]
    assert torch.equal(files["model.layers.0.mlp.gate_proj.weight"], fc1[:64])
    assert torch.equal(files["model.layers.0.mlp.up_proj.weight"], fc1[64:])
    assert torch.equal(files["model.layers.0.mlp.down_proj.bias"], tensors["layers.0.mlp.fc2.bias"])


def test_gpt2_conv1d_layout_sharding_and_bf16(tmp_path):
    cfg = CONFIGS["gpt_untied"]
    tensors = random_tensors(cfg, seed=3)
    out = export_hf(DictSource(cfg, tensors), tmp_path / "hf", max_shard_bytes=20_000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 2 and not (out / "model.safetensors").exists()
    merged = {}
    for file in shard_files:
        part = load_file(out / file)
        assert all(index["weight_map"][n] == file for n in part)
        merged.update(part)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    c_attn = merged["transformer.h.1.attn.c_attn.weight"]
    assert c_attn.shape == (32, 96) and torch.equal(c_attn, tensors["layers.1.attn.qkv.weight"].bfloat16().T)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = HFModelSource(out)  # stored dtype kept; bf16 -> exact comparison with the rounded originals
    for name, original in tensors.items():
        assert torch.equal(back.read(name), original.bfloat16()), name


def test_tokenizer_and_generation_ids_follow_the_model(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"fake": true}')
    (tok / "generation_config.json").write_text('{"bos_token_id": 5, "eos_token_id": 7}')
    (tok / "notes.txt").write_text("not a tokenizer file")
    cfg = CONFIGS["llama_gqa"]
    out = export_hf(DictSource(cfg, random_tensors(cfg), tok), tmp_path / "hf", progress=False)
    assert (out / "tokenizer.json").read_text() == '{"fake": true}'
    assert not (out / "notes.txt").exists()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 7
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == 5


def test_import_original_gpt2_naming_without_prefix_and_with_mask_buffers(tmp_path):
    cfg = CONFIGS["gpt_tied"]
    tensors = random_tensors(cfg, seed=4)
    out = export_hf(DictSource(cfg, tensors), tmp_path / "hf", dtype=torch.float32, progress=False)
    files = load_file(out / "model.safetensors")
    renamed = {n.removeprefix("transformer."): t for n, t in files.items()}
    renamed["h.0.attn.bias"] = torch.ones(1, 1, 32, 32)
    renamed["lm_head.weight"] = files["transformer.wte.weight"].clone()
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    source = HFModelSource(out)
    for name, original in tensors.items():
        assert torch.equal(source.read(name), original), name


def test_gpt2_exact_gelu_imports_with_a_warning(tmp_path):
    cfg = CONFIGS["gpt_untied"]
    out = export_hf(DictSource(cfg, random_tensors(cfg)), tmp_path / "hf", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["activation_function"] == "gelu_new"
    (out / "config.json").write_text(json.dumps({**config, "activation_function": "gelu"}))
    with pytest.warns(UserWarning, match="exact"):
        assert HFModelSource(out).model_config["activation"] == "gelu"
    (out / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(ConversionError, match="activation_function 'relu'"):
        HFModelSource(out)


def _damaged_copy(tmp_path, change):
    cfg = CONFIGS["llama_gqa"]
    out = export_hf(DictSource(cfg, random_tensors(cfg)), tmp_path / "hf", dtype=torch.float32, progress=False)
    files = load_file(out / "model.safetensors")
    change(files)
    save_file(files, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_import_names_missing_extra_and_misshapen_tensors(tmp_path):
    out = _damaged_copy(tmp_path / "a", lambda f: f.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(ConversionError, match=r"missing \['model\.layers\.2\.mlp\.up_proj\.weight'\]"):
        HFModelSource(out)
    out = _damaged_copy(tmp_path / "b", lambda f: f.update({"model.layers.9.extra": torch.zeros(2)}))
    with pytest.raises(ConversionError, match=r"unexpected \['model\.layers\.9\.extra'\]"):
        HFModelSource(out)
    out = _damaged_copy(
        tmp_path / "c", lambda f: f.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(8, 64)})
    )
    with pytest.raises(ConversionError, match=r"k_proj\.weight'.*\[8, 64\].*\[16, 64\]"):
        HFModelSource(out)


def test_import_rejects_unknown_architectures_and_settings(tmp_path):
    cfg = CONFIGS["llama_gqa"]
    out = export_hf(DictSource(cfg, random_tensors(cfg)), tmp_path / "hf", progress=False)
    config = json.loads((out / "config.json").read_text())
    cases = [
        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "unsupported architecture"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
        ({"head_dim": 16}, r"head_dim \(16\)"),
        ({"attention_bias": True}, r"attention_bias \(True\) != mlp_bias"),
    ]
    for change, message in cases:
        (out / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ConversionError, match=message):
            HFModelSource(out)
    (out / "config.json").write_text(json.dumps(config))
    (out / "model.safetensors").rename(out / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="never loaded"):
        HFModelSource(out)


def test_export_rejects_what_hf_cannot_express_and_bad_sources(tmp_path):
    gqa_gpt = dict(CONFIGS["gpt_tied"], num_kv_heads=2)
    with pytest.raises(ConversionError, match="no grouped-query attention"):
        export_hf(DictSource(gqa_gpt, random_tensors(gqa_gpt)), tmp_path / "a", progress=False)
    cfg = CONFIGS["llama_gqa"]
    tensors = random_tensors(cfg)
    tensors["layers.3.mlp.fc2.weight"] = torch.zeros(64, 95)
    with pytest.raises(ConversionError, match=r"'layers\.3\.mlp\.fc2\.weight' has shape \[64, 95\].*\[64, 96\]"):
        export_hf(DictSource(cfg, tensors), tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.tmp-*"))
    tensors = random_tensors(cfg)
    tensors.pop("final_norm.weight")
    tensors["layers.7.attn_norm.weight"] = torch.ones(64)
    with pytest.raises(ConversionError, match=r"missing \['final_norm\.weight'\].*\['layers\.7\.attn_norm\.weight'\]"):
        export_hf(DictSource(cfg, tensors), tmp_path / "c", progress=False)
    with pytest.raises(ConversionError, match="'family' = 'mamba'"):
        export_hf(DictSource(dict(cfg, family="mamba"), tensors), tmp_path / "d", progress=False)


def _save_transformers_model(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_import_models_written_by_transformers(family, tmp_path):
    """Random models built and saved by transformers itself import to tensors whose reference logits match."""
    torch.manual_seed(0)
    if family == "gpt":
        config = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                                         activation_function="gelu_new", tie_word_embeddings=True)  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                          num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                          rope_theta=20000.0, tie_word_embeddings=False)  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():  # transformers initialises biases and norms to constants; make them random
            p.add_(0.05 * torch.randn_like(p))
    path = _save_transformers_model(model.eval(), tmp_path / "hf")
    source = HFModelSource(path)
    tensors = dict(source.named_tensors())
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits.double()
    got = reference_logits(source.model_config, tensors, ids)
    err = (got - expected).abs().max().item()
    assert err < 1e-4 * expected.abs().max().item(), f"max |logit error| {err}"
    export_hf(DictSource(source.model_config, tensors), tmp_path / "again", dtype=torch.float32, progress=False)
    original = load_file(path / "model.safetensors")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert again.keys() <= original.keys()
    for name, tensor in again.items():
        assert torch.equal(tensor, original[name]), name
