"""Import and export against a parallel Megalith model on gloo (4 ranks).

1. `megalith-import hf --tp 2 --pp 2` of random-weight GPT-2 and Llama (GQA) models built by transformers, loaded
   into Megalith Transformer stages at tp2 x pp2 through the sharded checkpoint loader: a forward-only pipeline
   pass gives transformers' logits and loss.
2. Two training steps (core AdamW with the distributed optimizer + the pipeline schedule) at pp2 x dp2 (GPT-2,
   tied embeddings) and tp2 x dp2 (Llama), saved by the CheckpointManager under canonical names, then
   `megalith-export hf`: transformers loads the export and its logits equal the trained in-memory model's.

Both vocabularies (300) are not multiples of 128, so the tensor-parallel vocabulary padding is exercised.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.harness import run_distributed

transformers = pytest.importorskip("transformers")

import megalith.export.io as export_io  # noqa: E402
from megalith.core import ModelConfig, ParallelConfig, ParallelDims, build_loss_fn, build_model_chunks  # noqa: E402
from megalith.core.checkpoint import (  # noqa: E402
    MODEL_PREFIX,
    ModelCheckpointReader,
    load_sharded_state,
    model_sharded_state,
    read_full_tensors,
    resolve_checkpoint_dir,
)
from megalith.core.distributed import AdamW, DDPConfig, DistributedDataParallel, OptimizerConfig  # noqa: E402
from megalith.core.pipeline import forward_backward, unwrap  # noqa: E402
from megalith.export.cli import export_main, import_main  # noqa: E402
from megalith.training.checkpointing import CheckpointManager  # noqa: E402
from megalith.training.train_state import optimizer_state  # noqa: E402

B, S, VOCAB = 2, 12, 300


def _hf_model(family: str):
    torch.manual_seed(0)
    if family == "gpt":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                         activation_function="gelu_new", tie_word_embeddings=True)  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          rope_theta=20000.0, tie_word_embeddings=False)  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # move away from the init (zero biases, unit norms) so every tensor matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _batch(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, S), generator=gen)
    labels = torch.randint(0, VOCAB, (B, S), generator=gen)
    labels[:, :3] = -100
    return {"input_ids": ids, "labels": labels}


def _stages(config: ModelConfig, dims: ParallelDims):
    return build_model_chunks(config, dims, parallel=ParallelConfig(tp=dims.tp, pp=dims.pp))


def _pipeline_logits(chunks, batch, dims: ParallelDims, config: ModelConfig):
    """Forward-only pipeline pass: (mean loss, full [B, S, V] logits on last-stage ranks else None)."""
    recorded = []
    last = unwrap(chunks[-1])
    hook = last.register_forward_hook(lambda m, a, out: recorded.append(out.detach())) if last.final_norm else None
    loss = forward_backward(chunks, [batch], dims, loss_fn=build_loss_fn(last), hidden_shape=(B, S, config.hidden_size),
                            dtype=torch.float32, forward_only=True)  # fmt: skip
    if hook is not None:
        hook.remove()
    if not recorded:
        return loss, None
    local = recorded[0]
    if dims.tp > 1:
        parts = [torch.empty_like(local) for _ in range(dims.tp)]
        dist.all_gather(parts, local.contiguous(), group=dims.tp_group)
        local = torch.cat(parts, -1)
    return loss, local[..., : config.vocab_size]


def _import_worker(rank, world, cases):
    dims = ParallelDims(tp=2, pp=2)
    out = {}
    for family, ckpt in cases:
        config = ModelConfig.from_dict(ModelCheckpointReader(ckpt).model_config)
        chunks = _stages(config, dims)
        state = {}
        for chunk in chunks:
            state.update(model_sharded_state(chunk))
        load_sharded_state(state, resolve_checkpoint_dir(ckpt))
        with torch.no_grad():
            out[family] = _pipeline_logits(chunks, _batch(7), dims, config)
    return out


def test_import_at_tp2_pp2_matches_transformers(tmp_path):
    expected, cases = {}, []
    batch = _batch(7)
    for family in ("gpt", "llama"):
        hf = _hf_model(family)
        hf.save_pretrained(tmp_path / f"hf_{family}", safe_serialization=True)
        ckpt = tmp_path / f"ckpt_{family}"
        argv = ["hf", "--hf", str(tmp_path / f"hf_{family}"), "--out", str(ckpt), "--tp", "2", "--pp", "2"]
        assert import_main(argv) == 0
        with torch.no_grad():
            logits = hf(batch["input_ids"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        expected[family] = (float(loss), logits)
        cases.append((family, str(ckpt)))
    results = run_distributed(_import_worker, 4, cases, timeout=300)
    for rank, res in enumerate(results):
        for family, (loss, logits) in res.items():
            want_loss, want = expected[family]
            assert loss == pytest.approx(want_loss, rel=1e-5), (rank, family)
            last_stage = rank >= 2  # rank = tp_rank + 2 * pp_rank
            assert (logits is not None) == last_stage, (rank, family)
            if last_stage:
                torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


# ---- train two steps, save, export ---------------------------------------------------------------------------

TRAIN_CASES = {
    "gpt": (dict(tp=1, pp=2, dp=2), dict(family="gpt", vocab_size=VOCAB, hidden_size=32, num_layers=2,
            num_attention_heads=4, ffn_hidden_size=64, max_seq_len=32, norm="layernorm", activation="gelu",
            position_embedding="learned", bias=True, tie_embeddings=True, init_std=0.1)),
    "llama": (dict(tp=2, pp=1, dp=2), dict(family="llama", vocab_size=VOCAB, hidden_size=32, num_layers=2,
              num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=48, max_seq_len=32, norm="rmsnorm",
              activation="swiglu", position_embedding="rope", rope_base=20000.0, bias=False, tie_embeddings=False,
              init_std=0.1)),
}  # fmt: skip


def _train_worker(rank, world, root):
    out = {}
    for family, (layout, cfg) in TRAIN_CASES.items():
        dims = ParallelDims(**layout)
        config = ModelConfig(**cfg)
        chunks = [
            DistributedDataParallel(c, dims, DDPConfig(bucket_size=4000, use_distributed_optimizer=True))
            for c in _stages(config, dims)
        ]
        opt = AdamW(chunks, dims, OptimizerConfig(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1))
        losses = []
        for _ in range(2):
            opt.zero_grad()
            batches = [_batch(100 + 2 * dims.dp_rank + i) for i in range(2)]  # same data: the loss must drop
            losses.append(forward_backward(chunks, batches, dims, loss_fn=build_loss_fn(unwrap(chunks[-1])),
                                           hidden_shape=(B, S, config.hidden_size), dtype=torch.float32))  # fmt: skip
            assert opt.step().applied
        state = {}
        for chunk in chunks:
            state.update(model_sharded_state(chunk.module))
        state.update(optimizer_state(opt))
        manager = CheckpointManager(f"{root}/{family}", keep_last=None)
        manager.save(2, state, model_config=config.to_dict())
        with torch.no_grad():
            loss, logits = _pipeline_logits(chunks, _batch(7), dims, config)
        out[family] = (losses, loss, logits)
    return out


def test_train_two_steps_then_export_hf_matches_megalith(tmp_path, monkeypatch):
    results = run_distributed(_train_worker, 4, str(tmp_path / "ckpt"), timeout=300)
    batch = _batch(7)
    # Export streams the vocabulary tensors in blocks of 37 rows (crossing the tp2 chunk boundary at row 256).
    monkeypatch.setattr(export_io, "ROW_BLOCK_BYTES", 37 * 32 * 4)
    for family, (layout, cfg) in TRAIN_CASES.items():
        losses = results[0][family][0]
        assert losses[1] < losses[0], (family, losses)  # the two steps trained
        ckpt = tmp_path / "ckpt" / family
        reader = ModelCheckpointReader(ckpt)
        names = reader.tensor_names()
        assert "embed.weight" in names and ("output.weight" in names) == (not cfg["tie_embeddings"])
        for name in ("embed.weight", "output.weight", "layers.1.mlp.fc1.weight", "layers.1.mlp.fc2.weight"):
            if name in names:
                full = read_full_tensors(reader.path, [MODEL_PREFIX + name])[MODEL_PREFIX + name]  # whole-tensor path
                assert torch.equal(reader.read(name), full)
                for rows in (slice(0, 1), slice(250, 262), slice(255, 256), slice(3, 1000), slice(40, 40)):
                    assert torch.equal(reader.read(name, rows=rows), full[rows]), (family, name, rows)
        out = tmp_path / f"hf_{family}"
        assert export_main(["hf", "--load", str(ckpt), "--out", str(out), "--dtype", "fp32", "--quiet"]) == 0
        assert export_main(["verify", str(out)]) == 0
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            got = hf(batch["input_ids"]).logits
        hf_loss = float(F.cross_entropy(got.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100))
        holders = [r[family] for r in results if r[family][2] is not None]
        assert len(holders) == world_holders(layout)
        for _, loss, logits in holders:
            torch.testing.assert_close(got, logits, rtol=1e-4, atol=1e-4 * logits.abs().max().item())
            assert loss == pytest.approx(hf_loss, rel=1e-5)


def world_holders(layout: dict) -> int:
    """Ranks on the last pipeline stage (they all hold the gathered logits)."""
    return 4 // layout["pp"]
