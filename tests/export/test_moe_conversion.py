"""Mixtral, Qwen3-MoE and Qwen3 in and out: transformers' own random models against Megalith, TensorRT-LLM MoE.

Models are built by transformers with grouped-query attention, a vocabulary of 301 (not a multiple of 128) and 6
experts (not a power of two). Imported, they give transformers' logits in one process; exported again, transformers
reads back the same tensors. The TensorRT-LLM rank files of a Mixtral are reassembled here by the layout the
package documents (`reference/trtllm-moe.md`), written independently of the exporter.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from megalith.core import ModelConfig, build_model_chunks
from megalith.core.parallel.layers import local_from_canonical
from megalith.core.placement import canonical_pieces, named_placements
from megalith.export.cli import export_main, import_main
from megalith.export.hf import HFModelSource, export_hf
from megalith.export.spec import ConversionError
from megalith.export.trtllm import export_trtllm
from megalith.export.verify import verify_dir
from tests.export.common import DictSource

transformers = pytest.importorskip("transformers")

VOCAB, EXPERTS = 301, 6


def hf_model(family: str):
    """A random transformers model of `family`, every weight moved off its initial constant."""
    torch.manual_seed({"mixtral": 0, "qwen3": 1, "qwen3_moe": 2}[family])
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, rope_theta=20000.0, tie_word_embeddings=False)  # fmt: skip
    if family == "mixtral":
        config = transformers.MixtralConfig(**common, num_hidden_layers=2, num_local_experts=EXPERTS,
                                            num_experts_per_tok=2)  # fmt: skip
        model = transformers.MixtralForCausalLM(config)
    elif family == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, num_hidden_layers=2, head_dim=16))
    else:  # head_dim 16 is not hidden / heads = 8; layer 1 keeps a dense MLP
        config = transformers.Qwen3MoeConfig(**common, num_hidden_layers=4, head_dim=16, num_experts=EXPERTS,
                                             num_experts_per_tok=2, moe_intermediate_size=12, norm_topk_prob=True,
                                             mlp_only_layers=[1])  # fmt: skip
        model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def load_canonical(model, tensors: dict[str, torch.Tensor]) -> None:
    """Fills a Megalith model (or this rank's part of it) from full canonical tensors."""
    with torch.no_grad():
        for name, p, where in named_placements(model):
            for canonical, view in canonical_pieces(name, p.data, where):
                view.copy_(local_from_canonical(tensors[canonical], where.shard, view.shape))


@pytest.mark.parametrize("family", ["mixtral", "qwen3", "qwen3_moe"])
def test_transformers_models_import_and_export_exactly(family, tmp_path):
    model = hf_model(family)
    model.save_pretrained(tmp_path / "hf")
    source = HFModelSource(tmp_path / "hf")
    config = ModelConfig.from_dict(source.model_config)
    assert config.family == family and config.qk_norm == family.startswith("qwen3")
    assert config.num_experts == (0 if family == "qwen3" else EXPERTS)
    if family == "qwen3_moe":
        assert config.moe_layer_freq == [1, 0, 1, 1] and config.head_dim == 16 and config.moe_norm_topk_prob
    tensors = dict(source.named_tensors())
    (megalith,) = build_model_chunks(config)
    load_canonical(megalith, tensors)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = model(ids).logits, megalith(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    out = export_hf(DictSource(source.model_config, tensors), tmp_path / "again", dtype=torch.float32, progress=False)
    assert verify_dir(out) == []
    original, again = load_file(tmp_path / "hf" / "model.safetensors"), load_file(out / "model.safetensors")
    assert again.keys() == original.keys()
    for name, tensor in again.items():
        assert torch.equal(tensor, original[name]), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, want)


def test_export_refuses_what_the_hugging_face_classes_cannot_express(tmp_path):
    model = hf_model("mixtral")
    model.save_pretrained(tmp_path / "hf")
    source = HFModelSource(tmp_path / "hf")
    tensors = dict(source.named_tensors())
    cases = [
        ({"moe_score_function": "sigmoid"}, "MixtralForCausalLM routes with a softmax"),
        ({"moe_norm_topk_prob": False}, r"renormalises the top-k weights"),
        ({"family": "llama"}, r"LlamaForCausalLM has no routed experts, .* num_experts = 6; set family to"),
        ({"family": "qwen3_moe"}, "Qwen3MoeForCausalLM always has qk-norm"),
    ]
    for change, message in cases:
        with pytest.raises(ConversionError, match=message):
            export_hf(DictSource({**source.model_config, **change}, tensors), tmp_path / "x", progress=False)
    biased = {**source.model_config, "moe_expert_bias": True}
    with pytest.raises(ConversionError, match="has no shared expert and no expert bias"):
        export_hf(DictSource(biased, tensors), tmp_path / "y", progress=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "sliding_window": 4096}))
    with pytest.raises(ConversionError, match="sliding-window attention is not supported"):
        HFModelSource(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert import_main(["hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "c"), "--ep", "4"]) == 2


# ---- TensorRT-LLM --------------------------------------------------------------------------------------------

MIXTRAL = dict(family="mixtral", vocab_size=VOCAB, hidden_size=32, num_layers=4, num_attention_heads=4,
               num_kv_heads=2, ffn_hidden_size=8, max_seq_len=32, norm="rmsnorm", norm_eps=1e-5, activation="swiglu",
               position_embedding="rope", rope_base=10000.0, rope_scaling=None, bias=False, tie_embeddings=False,
               init_std=0.02, num_experts=8, moe_top_k=2)  # fmt: skip


def _mixtral_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random canonical tensors of MIXTRAL, shapes written out here: experts [2I, H] (gate; up) and [H, I]."""
    g = torch.Generator().manual_seed(seed)
    h, i, d = 32, 8, 8
    shapes = {"embed.weight": (VOCAB, h), "final_norm.weight": (h,), "output.weight": (VOCAB, h)}
    for layer in range(4):
        p = f"layers.{layer}."
        shapes.update({p + "attn_norm.weight": (h,), p + "attn.qkv.weight": ((4 + 2 * 2) * d, h),
                       p + "attn.proj.weight": (h, 4 * d), p + "mlp_norm.weight": (h,),
                       p + "mlp.router.weight": (8, h)})  # fmt: skip
        for e in range(8):
            shapes.update({f"{p}mlp.experts.{e}.fc1.weight": (2 * i, h), f"{p}mlp.experts.{e}.fc2.weight": (h, i)})
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


@pytest.mark.parametrize(("tp", "ep", "pp"), [(1, 1, 1), (2, 1, 2), (2, 2, 1), (4, 2, 2), (4, 4, 1)])
def test_mixtral_trtllm_rank_files_reassemble_the_experts(tp, ep, pp, tmp_path):
    tensors = _mixtral_tensors()
    out = export_trtllm(DictSource(MIXTRAL, tensors), tmp_path / "trt", tp=tp, pp=pp, ep=ep, dtype=torch.float32,
                        progress=False)  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "MixtralForCausalLM" and config["hidden_act"] == "swiglu"
    assert config["moe"] == {"num_experts": 8, "top_k": 2, "normalization_mode": 1}
    assert config["mapping"] == {"world_size": tp * pp, "tp_size": tp, "pp_size": pp, "moe_tp_size": tp // ep,
                                 "moe_ep_size": ep}  # fmt: skip
    assert config["intermediate_size"] == 8
    assert verify_dir(out) == []
    moe_tp, local, inner = tp // ep, 8 // ep, 8 // (tp // ep)
    per_stage = 4 // pp
    files = {r: load_file(out / f"rank{r}.safetensors") for r in range(tp * pp)}
    for layer in range(4):
        stage, j = divmod(layer, per_stage)
        s = f"transformer.layers.{j}."
        for t in range(tp):
            rank = files[stage * tp + t]
            router = rank[s + "mlp.router.weight"]
            assert router.dtype == torch.float32 and torch.equal(router, tensors[f"layers.{layer}.mlp.router.weight"])
            fc, proj = rank[s + "mlp.fc.weight"], rank[s + "mlp.proj.weight"]
            assert fc.shape == (local, 2 * inner, 32) and proj.shape == (local, 32, inner)
            moe_ep_rank, moe_tp_rank = t % ep, t // ep  # TensorRT-LLM's Mapping
            for slot in range(local):
                e = moe_ep_rank * local + slot
                gate, up = tensors[f"layers.{layer}.mlp.experts.{e}.fc1.weight"].chunk(2)
                cols = slice(moe_tp_rank * inner, (moe_tp_rank + 1) * inner)
                assert torch.equal(fc[slot, :inner], up[cols]), (layer, t, e)  # w3 (up) first
                assert torch.equal(fc[slot, inner:], gate[cols]), (layer, t, e)  # then w1 (gate)
                w2 = tensors[f"layers.{layer}.mlp.experts.{e}.fc2.weight"]
                assert torch.equal(proj[slot], w2[:, cols]), (layer, t, e)
    assert moe_tp * ep == tp


def test_trtllm_moe_layouts_that_do_not_fit_are_refused(tmp_path):
    source = DictSource(MIXTRAL, _mixtral_tensors())
    cases = [
        (dict(tp=4, ep=3), r"--ep \(3\) must divide --tp \(4\)"),
        (dict(tp=3, ep=3), r"num_attention_heads \(4\) is not divisible by tp \(3\)"),
        (dict(tp=16, ep=16), r"num_attention_heads \(4\) is not divisible by tp \(16\)"),
    ]
    for layout, message in cases:
        with pytest.raises(ConversionError, match=message):
            export_trtllm(source, tmp_path / "t", progress=False, **layout)
    narrow = DictSource(dict(MIXTRAL, ffn_hidden_size=6), {})
    with pytest.raises(ConversionError, match=r"intermediate size \(6\) is not divisible by moe_tp_size \(4 = --tp 4"):
        export_trtllm(narrow, tmp_path / "t", tp=4, ep=1, progress=False)
    qwen = dict(MIXTRAL, family="qwen3_moe", qk_norm=True)
    with pytest.raises(ConversionError, match="a 'qwen3_moe' model is not one of them"):
        export_trtllm(DictSource(qwen, {}), tmp_path / "q", progress=False)
    config = dict(MIXTRAL, num_experts=6)
    with pytest.raises(ConversionError, match=r"num_experts \(6\) is not divisible by --ep \(4\)"):
        export_trtllm(DictSource(config, {}), tmp_path / "u", tp=4, ep=4, progress=False)
    assert not (tmp_path / "t").exists()


def test_cli_trtllm_ep_flag(tmp_path):
    from megalith.export.io import write_canonical_dir

    write_canonical_dir(tmp_path / "canon", MIXTRAL, iter(_mixtral_tensors().items()))
    argv = ["trtllm", "--load", str(tmp_path / "canon"), "--out", str(tmp_path / "t"), "--tp", "2", "--ep", "2"]
    assert export_main([*argv, "--quiet"]) == 0
    assert json.loads((tmp_path / "t" / "config.json").read_text())["mapping"]["moe_ep_size"] == 2
    assert math.prod(load_file(tmp_path / "t" / "rank1.safetensors")["transformer.layers.0.mlp.fc.weight"].shape) == (
        4 * 16 * 32
    )


# ---- on gloo: import at ep2 x tp2, train at ep2 x tp2 then export -----------------------------------------------


def _gathered_logits(model, ids, dims) -> torch.Tensor:
    with torch.no_grad():
        local = model(ids)
    if dims.tp > 1:
        parts = [torch.empty_like(local) for _ in range(dims.tp)]
        torch.distributed.all_gather(parts, local.contiguous(), group=dims.tp_group)
        local = torch.cat(parts, -1)
    return local[..., :VOCAB]


def _import_worker(rank, world, cases, ids):
    from megalith.core import ParallelConfig, ParallelDims
    from megalith.core.checkpoint import ModelCheckpointReader, load_sharded_state, resolve_checkpoint_dir
    from megalith.training.train_state import model_state

    out = {}
    for family, ckpt in cases:
        config = ModelConfig.from_dict(ModelCheckpointReader(ckpt).model_config)
        parallel = ParallelConfig(tp=2, ep=2 if config.num_experts else 1, sequence_parallel=family == "mixtral")
        dims = ParallelDims.from_config(parallel, world)
        chunks = build_model_chunks(config, dims, parallel=parallel)
        load_sharded_state(model_state(chunks), resolve_checkpoint_dir(ckpt))
        out[family] = _gathered_logits(chunks[0].eval(), ids, dims)
    return out


def test_import_at_ep2_tp2_matches_transformers(tmp_path):
    from tests.harness import run_distributed

    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    expected, cases = {}, []
    for family in ("mixtral", "qwen3_moe", "qwen3"):
        model = hf_model(family)
        model.save_pretrained(tmp_path / f"hf_{family}")
        ep = "1" if family == "qwen3" else "2"
        argv = ["hf", "--hf", str(tmp_path / f"hf_{family}"), "--out", str(tmp_path / family), "--tp", "2", "--ep", ep]
        assert import_main(argv) == 0
        with torch.no_grad():
            expected[family] = model(ids).logits
        cases.append((family, str(tmp_path / family)))
    for rank, result in enumerate(run_distributed(_import_worker, 4, cases, ids, timeout=600)):
        for family, logits in result.items():
            torch.testing.assert_close(logits, expected[family], rtol=1e-4, atol=1e-5, msg=f"rank {rank} {family}")


def _train_and_save(rank, world, root, cfg, ids):
    from megalith.core import ParallelConfig, ParallelDims, build_loss_fn
    from megalith.core.distributed import AdamW, DDPConfig, DistributedDataParallel, OptimizerConfig
    from megalith.core.pipeline import forward_backward
    from megalith.training.checkpointing import CheckpointManager
    from megalith.training.train_state import model_state, optimizer_state

    config = ModelConfig(**cfg)
    parallel = ParallelConfig(tp=2, ep=2, sequence_parallel=True)
    dims = ParallelDims.from_config(parallel, world)
    chunks = [DistributedDataParallel(c, dims, DDPConfig(bucket_size=3000, use_distributed_optimizer=True))
              for c in build_model_chunks(config, dims, parallel=parallel)]  # fmt: skip
    opt = AdamW(chunks, dims, OptimizerConfig(lr=1e-2))
    losses = []
    for _ in range(2):  # the same batch twice: the loss must drop
        opt.zero_grad()
        gen = torch.Generator().manual_seed(10 + dims.data_rank)
        batch = {"input_ids": torch.randint(0, VOCAB, (2, 12), generator=gen)}
        batch["labels"] = batch["input_ids"].roll(-1, 1)
        losses.append(forward_backward(chunks, [batch], dims, loss_fn=build_loss_fn(chunks[0].module),
                                       hidden_shape=(2, 6, config.hidden_size), dtype=torch.float32))  # fmt: skip
        assert opt.step().applied
    state = {**model_state(chunks), **optimizer_state(opt)}
    CheckpointManager(root, keep_last=None).save(2, state, model_config=config.to_dict())
    return losses, _gathered_logits(chunks[0].module.eval(), ids, dims)


def test_train_at_ep2_tp2_then_export_hf_matches_megalith(tmp_path):
    from tests.harness import run_distributed

    cfg = dict(MIXTRAL, num_experts=6, moe_aux_loss_coeff=0.01, init_std=0.1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    results = run_distributed(_train_and_save, 4, str(tmp_path / "ckpt"), cfg, ids, timeout=600)
    assert export_main(["hf", "--load", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--dtype", "fp32",
                        "--quiet"]) == 0  # fmt: skip
    assert verify_dir(tmp_path / "hf") == []
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        exported = model(ids).logits
    for losses, logits in results:
        assert losses[1] < losses[0]
        torch.testing.assert_close(exported, logits, rtol=1e-4, atol=1e-5)
