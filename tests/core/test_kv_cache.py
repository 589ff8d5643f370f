"""The model's incremental-decoding path: cached logits equal a full forward, padding is invisible."""

from __future__ import annotations

import pytest
import torch

from megalith.core import RuntimeConfig
from megalith.core.models import KVCache, Transformer
from tests.core.parallel_checks import build, gpt_config, llama_config

CONFIGS = {
    "gpt": lambda: gpt_config(max_seq_len=32),  # learned positions, LayerNorm, tied output
    "llama": lambda: llama_config(max_seq_len=32),  # GQA 8/4, scaled RoPE, RMSNorm, SwiGLU
}


def _model(family: str, kernels: str = "torch", dtype=torch.float64) -> Transformer:
    return build(CONFIGS[family](), runtime=RuntimeConfig(kernels=kernels), seed=3, dtype=dtype).eval()


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_cached_logits_equal_a_full_forward(family):
    model = _model(family)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        assert full.shape[-1] == vocab
        cache = KVCache(model, 3, 20)
        pieces, start = [], 0
        for size in (7, 1, 1, 4, 1, 6):  # a prompt, single tokens, and chunks
            pieces.append(cache.run(model, ids[:, start : start + size]))
            start += size
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-12)
    assert full.std() > 0.05  # the comparison is not between near-constant tensors


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_is_invisible(family, side):
    """A padded batch (padding masked out) gives each row the logits of that row alone, then decodes on."""
    model = _model(family)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, vocab, (n,), generator=gen) for n in (9, 4, 6)]
    nxt = torch.randint(0, vocab, (3, 2), generator=gen)
    width = 9
    ids = torch.full((3, width), 7, dtype=torch.long)  # the pad id is a real token: only the mask hides it
    valid = torch.zeros(3, width, dtype=torch.bool)
    for r, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[r, cols], valid[r, cols] = row, True
    with torch.no_grad():
        cache = KVCache(model, 3, width + 2)
        prompt_logits = cache.run(model, ids, valid_BS=valid)
        step_logits = [cache.run(model, nxt[:, i : i + 1])[:, 0] for i in range(2)]
        for r, row in enumerate(rows):
            alone = model(torch.cat([row, nxt[r]])[None])[0]
            torch.testing.assert_close(prompt_logits[r][valid[r]], alone[: len(row)], rtol=0, atol=1e-12)
            for i in range(2):
                torch.testing.assert_close(step_logits[i][r], alone[len(row) + i], rtol=0, atol=1e-12)


def test_explicit_positions_and_errors():
    model = _model("gpt")
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        cache = KVCache(model, 1, 6)
        cache.run(model, ids)
        with pytest.raises(ValueError, match="7 slots needed but the cache holds 6"):
            cache.run(model, ids[:, :2])
        assert cache.length == 5  # the failed step left the cache as it was
        cache.run(model, ids[:, :1])
        other = KVCache(model, 1, 4)
        with pytest.raises(ValueError, match=r"position 32 exceeds the learned positions \(max_seq_len 32\)"):
            other.run(model, ids[:, :1], positions_BS=torch.tensor([[32]]))
        assert other.length == 0
    model.train()
    with pytest.raises(RuntimeError, match=r"call model\.eval\(\)"):
        KVCache(model, 1, 5).run(model, ids)
    model.eval()
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with torch.no_grad(), pytest.raises(ValueError, match="position_ids and cu_seqlens are for training and scoring"):
        model(ids, cu_seqlens=cu, cache=KVCache(model, 1, 6))


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_decoding_uses_the_fused_kernels_too(family, monkeypatch):
    """kernels="fused" decodes through Megalith's kernels (per-row RoPE positions included) and matches torch."""
    from megalith.kernels import ops

    calls = []
    for name in ("rope", "rms_norm", "layer_norm"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    fused, plain = _model(family, "fused", torch.float32), _model(family, "torch", torch.float32)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, fused.config.vocab_size, (2, 6), generator=gen)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, :2] = False  # rows at different positions: per-row rotary tables
    outs = []
    with torch.no_grad():
        for model in (fused, plain):
            cache = KVCache(model, 2, 8)
            outs.append(torch.cat([cache.run(model, ids, valid_BS=valid), cache.run(model, ids[:, :1])], dim=1))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    assert ("rope" in calls) == (family == "llama") and {"rms_norm", "layer_norm"} & set(calls)
