"""`megalith-export verify` accepts clean exports and lists every deliberate damage."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from megalith.export.hf import export_hf
from megalith.export.trtllm import export_trtllm
from megalith.export.verify import verify_dir
from tests.export.common import CONFIGS, DictSource, random_tensors


def _rewrite(path, change):
    files = load_file(path)
    change(files)
    save_file(files, path, metadata={"format": "pt"})


@pytest.fixture
def exports(tmp_path):
    cfg = CONFIGS["llama_gqa"]
    src = DictSource(cfg, random_tensors(cfg))
    hf = export_hf(src, tmp_path / "hf", max_shard_bytes=60_000, progress=False)
    trt = export_trtllm(src, tmp_path / "trt", tp=4, pp=2, progress=False)
    gpt = CONFIGS["gpt_tied"]
    gpt_hf = export_hf(DictSource(gpt, random_tensors(gpt)), tmp_path / "gpt", progress=False)
    return hf, trt, gpt_hf


def test_clean_exports_pass(exports):
    for path in exports:
        assert verify_dir(path) == [], path


def test_damaged_hf_export_lists_every_mismatch(exports):
    hf = exports[0]
    index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    renamed, reshaped = "model.layers.1.mlp.up_proj.weight", "model.layers.2.self_attn.k_proj.weight"
    retyped = "model.norm.weight"

    def rename(files):
        files["model.layers.1.mlp.upp_proj.weight"] = files.pop(renamed)

    _rewrite(hf / index[renamed], rename)
    _rewrite(hf / index[reshaped], lambda f: f.update({reshaped: f[reshaped][:8].contiguous()}))
    _rewrite(hf / index[retyped], lambda f: f.update({retyped: f[retyped].half()}))
    problems = verify_dir(hf)
    text = "\n".join(problems)
    assert f"missing tensor {renamed} (BF16 [96, 64])" in text
    assert "unexpected tensor model.layers.1.mlp.upp_proj.weight" in text
    assert f"{reshaped} has shape [8, 64], config implies [16, 64]" in text
    assert f"{retyped} has dtype F16, config implies BF16" in text
    assert "places in None" in text  # the renamed tensor is not in the index either


def test_damaged_trtllm_export_lists_every_mismatch(exports):
    trt = exports[1]
    _rewrite(trt / "rank5.safetensors", lambda f: f.update({"lm_head.weight": f["lm_head.weight"][:-1].contiguous()}))
    _rewrite(trt / "rank2.safetensors", lambda f: f.pop("transformer.vocab_embedding.weight"))
    (trt / "rank7.safetensors").unlink()
    problems = verify_dir(trt)
    assert "rank5.safetensors: lm_head.weight has shape [25, 64], config implies [26, 64]" in problems
    assert "rank2.safetensors: missing tensor transformer.vocab_embedding.weight (BF16 [101, 64])" in problems
    assert "rank7.safetensors: missing (world_size 8)" in problems
    assert len(problems) == 3
    config = json.loads((trt / "config.json").read_text())
    (trt / "config.json").write_text(json.dumps({**config, "mapping": {"world_size": 6, "tp_size": 3, "pp_size": 2}}))
    assert verify_dir(trt) == ["num_attention_heads (8) is not divisible by tp (3)"]
    (trt / "config.json").write_text(json.dumps({**config, "num_attention_heads": 6}))
    assert verify_dir(trt) == [f"{trt / 'config.json'}: head_size 8 * 6 heads != hidden_size 64"]


def test_gpt2_export_with_wrong_dtype_everywhere(exports):
    gpt = exports[2]
    config = json.loads((gpt / "config.json").read_text())
    (gpt / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    problems = verify_dir(gpt)
    assert len(problems) == len(load_file(gpt / "model.safetensors"))
    assert all("has dtype BF16, config implies F32" in p for p in problems)
    missing = gpt.parent / "nothing" / "config.json"
    assert verify_dir(gpt.parent / "nothing") == [f"{missing}: cannot read (No such file or directory)"]
