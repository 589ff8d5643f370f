"""Every config field conversion reads is type-checked: errors name the file, the field and the value."""

from __future__ import annotations

import json

import pytest
import torch

from megalith.export.cli import export_main, import_main
from megalith.export.hf import export_hf
from megalith.export.io import write_canonical_dir
from megalith.export.mapping import entries
from megalith.export.spec import model_config_from_dict
from megalith.export.trtllm import export_trtllm
from tests.export.common import CONFIGS, DictSource, random_tensors

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}  # fmt: skip

HF_CASES = [  # (family, change to config.json, field, value as the file shows it, what it must be)
    ("llama", {"tie_word_embeddings": "false"}, "tie_word_embeddings", '"false"', "a JSON bool (true or false)"),
    ("llama", {"attention_bias": "false"}, "attention_bias", '"false"', "a JSON bool (true or false)"),
    ("llama", {"vocab_size": "101"}, "vocab_size", '"101"', "a positive integer"),
    ("llama", {"num_hidden_layers": 4.0}, "num_hidden_layers", "4.0", "a positive integer"),
    ("llama", {"num_hidden_layers": 0}, "num_hidden_layers", "0", "a positive integer"),
    ("llama", {"num_key_value_heads": True}, "num_key_value_heads", "true", "a positive integer"),
    ("llama", {"head_dim": "8"}, "head_dim", '"8"', "a positive integer"),
    ("llama", {"max_position_embeddings": -32}, "max_position_embeddings", "-32", "a positive integer"),
    ("llama", {"rms_norm_eps": "1e-6"}, "rms_norm_eps", '"1e-6"', "a positive finite number"),
    ("llama", {"rms_norm_eps": float("nan")}, "rms_norm_eps", "NaN", "a positive finite number"),
    ("llama", {"rope_theta": "abc"}, "rope_theta", '"abc"', "a positive finite number"),
    ("llama", {"rope_theta": float("inf")}, "rope_theta", "Infinity", "a positive finite number"),
    ("llama", {"initializer_range": "0.02"}, "initializer_range", '"0.02"', "a finite number"),
    ("llama", {"hidden_act": 5}, "hidden_act", "5", "a string"),
    ("llama", {"model_type": ["llama"]}, "model_type", '["llama"]', "a string"),
    ("llama", {"architectures": "LlamaForCausalLM"}, "architectures", '"LlamaForCausalLM"', "a list of strings"),
    ("llama", {"rope_scaling": "llama3"}, "rope_scaling", '"llama3"', "a JSON object"),
    ("llama", {"rope_scaling": dict(LLAMA3, factor="8")}, "rope_scaling.factor", '"8"', "a positive finite number"),
    ("llama", {"rope_scaling": dict(LLAMA3, original_max_position_embeddings=8.5)},
     "rope_scaling.original_max_position_embeddings", "8.5", "a positive integer"),
    ("llama", {"rope_scaling": dict(LLAMA3, rope_type=3)}, "rope_scaling.rope_type", "3", "a string"),
    ("gpt", {"tie_word_embeddings": "false"}, "tie_word_embeddings", '"false"', "a JSON bool (true or false)"),
    ("gpt", {"n_inner": "48"}, "n_inner", '"48"', "a positive integer"),
    ("gpt", {"scale_attn_weights": "true"}, "scale_attn_weights", '"true"', "a JSON bool (true or false)"),
    ("gpt", {"layer_norm_epsilon": -1e-5}, "layer_norm_epsilon", "-1e-05", "a positive finite number"),
    ("gpt", {"activation_function": None, "n_embd": 32.5}, "n_embd", "32.5", "a positive integer"),
]  # fmt: skip


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family, name in (("llama", "llama_gqa"), ("gpt", "gpt_untied")):
        cfg = CONFIGS[name]
        out[family] = export_hf(DictSource(cfg, random_tensors(cfg)), root / family, dtype=torch.float32,
                                progress=False)  # fmt: skip
    return out


@pytest.mark.parametrize(("family", "change", "field", "shown", "kind"), HF_CASES)
def test_import_names_the_file_field_and_value(family, change, field, shown, kind, hf_dirs, tmp_path, capsys):
    config_path = hf_dirs[family] / "config.json"
    original = config_path.read_text()
    try:
        config_path.write_text(json.dumps({**json.loads(original), **change}))
        assert (
            import_main(["hf", "--hf", str(hf_dirs[family]), "--out", str(tmp_path / "c"), "--format", "canonical"])
            == 2
        )
    finally:
        config_path.write_text(original)
    message = f"{config_path}: field {field!r} = {shown} is not {kind}"
    assert capsys.readouterr().err == f"megalith-import: error: {message}\n"
    assert not (tmp_path / "c").exists()


def test_a_config_that_is_not_an_object(hf_dirs, tmp_path, capsys):
    config_path = hf_dirs["llama"] / "config.json"
    original = config_path.read_text()
    try:
        config_path.write_text("[1, 2]")
        assert import_main(["hf", "--hf", str(hf_dirs["llama"]), "--out", str(tmp_path / "c")]) == 2
    finally:
        config_path.write_text(original)
    assert capsys.readouterr().err == f"megalith-import: error: {config_path}: expected a JSON object, got [1, 2]\n"


CANONICAL_CASES = [  # (change to the model config in megalith.json, the error after "<file>: model config")
    ({"norm_eps": float("nan")}, " field 'norm_eps' = nan is not finite"),
    ({"rope_base": float("inf")}, " field 'rope_base' = inf is not finite"),
    ({"ffn_hidden_size": 0}, ": ModelConfig.ffn_hidden_size must be a positive integer, got 0"),
    ({"max_seq_len": -1}, ": ModelConfig.max_seq_len must be a positive integer, got -1"),
    ({"norm_eps": 0.0}, ": ModelConfig.norm_eps must be a positive finite number, got 0.0"),
    ({"tie_embeddings": "false"}, " field 'tie_embeddings' = 'false' is not a bool"),
    ({"rope_scaling": dict(LLAMA3, factor="8")}, " field 'rope_scaling.factor' = '8' is not a number"),
    ({"rope_scaling": dict(LLAMA3, factor=-8.0)}, " field 'rope_scaling.factor' = -8.0 must be positive"),
    ({"rope_scaling": dict(LLAMA3, original_max_position_embeddings=True)},
     " field 'rope_scaling.original_max_position_embeddings' = True is not an integer"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "message"), CANONICAL_CASES)
def test_export_names_the_model_config_file_field_and_value(change, message, tmp_path, capsys):
    cfg = CONFIGS["llama_gqa"]
    tensors = random_tensors(cfg)
    order = [e.canonical for e in entries(model_config_from_dict(cfg))]
    write_canonical_dir(tmp_path / "canon", cfg, ((n, tensors[n]) for n in order))
    doc_path = tmp_path / "canon" / "megalith.json"
    doc = json.loads(doc_path.read_text())
    doc["model_config"].update(change)
    doc_path.write_text(json.dumps(doc))
    assert export_main(["hf", "--load", str(tmp_path / "canon"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert capsys.readouterr().err == f"megalith-export: error: {doc_path}: model config{message}\n"


TRT_CASES = [  # (change to a TensorRT-LLM config.json, the problem verify reports after "<file>: ")
    ({"mapping": "tp2"}, """field 'mapping' = "tp2" is not a JSON object"""),
    ({"mapping": {"world_size": 2, "tp_size": "2", "pp_size": 1}},
     """field 'mapping.tp_size' = "2" is not a positive integer"""),
    ({"hidden_size": "64"}, """field 'hidden_size' = "64" is not a positive integer"""),
    ({"norm_epsilon": float("nan")}, "field 'norm_epsilon' = NaN is not a positive finite number"),
    ({"attn_bias": "false", "mlp_bias": "false"}, """field 'attn_bias' = "false" is not a JSON bool (true or false)"""),
    ({"architecture": ["LlamaForCausalLM"]}, """field 'architecture' = ["LlamaForCausalLM"] is not a string"""),
]  # fmt: skip


def test_verify_names_the_field_of_a_bad_trtllm_config(tmp_path, capsys):
    cfg = CONFIGS["llama_gqa"]
    trt = export_trtllm(DictSource(cfg, random_tensors(cfg)), tmp_path / "trt", tp=2, progress=False)
    config_path = trt / "config.json"
    original = json.loads(config_path.read_text())
    for change, problem in TRT_CASES:
        config_path.write_text(json.dumps({**original, **change}))
        assert export_main(["verify", str(trt)]) == 1
        assert capsys.readouterr().out.splitlines() == [f"{config_path}: {problem}", f"{trt}: 1 problem(s)"], change
    config_path.write_text("3")
    assert export_main(["verify", str(trt)]) == 1
    assert capsys.readouterr().out.splitlines()[0] == f"{config_path}: expected a JSON object, got 3"
