"""Megalith's own model against transformers through import and export (single process, tp = pp = 1)."""

from __future__ import annotations

import pytest
import torch

from megalith.core import ModelConfig, build_model_chunks
from megalith.export.hf import HFModelSource, export_hf
from tests.export.common import DictSource

transformers = pytest.importorskip("transformers")


def _transformers_model(family: str):
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
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _megalith_model(cfg: dict, tensors: dict[str, torch.Tensor]):
    (model,) = build_model_chunks(ModelConfig.from_dict(cfg), empty=True)
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(tensors)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])  # one device: the canonical shapes, no vocabulary padding
    return model.eval()


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_import_into_megalith_and_export_back_match_transformers(family, tmp_path):
    hf_model = _transformers_model(family)
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    source = HFModelSource(tmp_path / "hf")
    cfg, tensors = source.model_config, dict(source.named_tensors())
    model = _megalith_model(cfg, tensors)
    ids = torch.randint(0, cfg["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())

    # Export what the Megalith model holds and load it back into transformers.
    held = {n: p.detach().clone() for n, p in model.named_parameters()}
    export_hf(DictSource(cfg, held), tmp_path / "out", dtype=torch.float32, progress=False)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, got, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_import_to_a_training_checkpoint_and_export_from_it(tmp_path):
    """megalith-import hf -> write_model_checkpoint -> ModelCheckpointReader -> megalith-export hf / trtllm."""
    from safetensors.torch import load_file

    from megalith.export.cli import export_main, import_main
    from tests.export.common import CONFIGS, random_tensors

    cfg = CONFIGS["llama_gqa"]
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    export_hf(DictSource(cfg, random_tensors(cfg), tok), tmp_path / "hf", dtype=torch.float32, progress=False)
    assert import_main(["hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"), "--tp", "2"]) == 0
    out = tmp_path / "hf2"
    assert export_main(["hf", "--load", str(tmp_path / "ckpt"), "--out", str(out), "--dtype", "fp32", "--quiet"]) == 0
    before, after = load_file(tmp_path / "hf" / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert (out / "tokenizer.json").is_file()
    trt = tmp_path / "trt"
    assert export_main(["trtllm", "--load", str(tmp_path / "ckpt"), "--out", str(trt), "--tp", "4", "--pp", "2"]) == 0
    assert export_main(["verify", str(trt)]) == 0
