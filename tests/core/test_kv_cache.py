"""The model's incremental-decoding path: cached logits equal a full forward, padding is invisible."""

from __future__ import annotations

import pytest
import torch

from megalith.core.models import KVCache, Transformer
from tests.core.parallel_checks import gpt_config, llama_config

CONFIGS = {
    "gpt": lambda: gpt_config(max_seq_len=32),  # learned positions, LayerNorm, tied output
    "llama": lambda: llama_config(max_seq_len=32),  # GQA 8/4, scaled RoPE, RMSNorm, SwiGLU
}


def _model(family: str) -> Transformer:
    return Transformer(CONFIGS[family](), seed=3, dtype=torch.float64).eval()


def _logits(model, h_BSH) -> torch.Tensor:
    return model.head(h_BSH)[..., : model.config.vocab_size]


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_cached_logits_equal_a_full_forward(family):
    model = _model(family)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)[..., :vocab]
        cache = KVCache(model, 3, 20)
        pieces, start = [], 0
        for size in (7, 1, 1, 4, 1, 6):  # a prompt, single tokens, and chunks
            pieces.append(_logits(model, model.forward_cached(ids[:, start : start + size], cache)))
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
        prompt_logits = _logits(model, model.forward_cached(ids, cache, valid_BS=valid))
        step_logits = [_logits(model, model.forward_cached(nxt[:, i : i + 1], cache))[:, 0] for i in range(2)]
        for r, row in enumerate(rows):
            alone = model(torch.cat([row, nxt[r]])[None])[0, :, :vocab]
            torch.testing.assert_close(prompt_logits[r][valid[r]], alone[: len(row)], rtol=0, atol=1e-12)
            for i in range(2):
                torch.testing.assert_close(step_logits[i][r], alone[len(row) + i], rtol=0, atol=1e-12)


def test_explicit_positions_and_errors():
    model = _model("gpt")
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        cache = KVCache(model, 1, 6)
        model.forward_cached(ids, cache)
        with pytest.raises(ValueError, match="7 slots needed but the cache holds 6"):
            model.forward_cached(ids[:, :2], cache)
        assert cache.length == 5  # the failed step left the cache as it was
        model.forward_cached(ids[:, :1], cache)
        other = KVCache(model, 1, 4)
        with pytest.raises(ValueError, match=r"position 32 exceeds the learned positions \(max_seq_len 32\)"):
            model.forward_cached(ids[:, :1], other, positions_BS=torch.tensor([[32]]))
        assert other.length == 0
    model.train()
    with pytest.raises(RuntimeError, match=r"call model\.eval\(\)"):
        model.forward_cached(ids, KVCache(model, 1, 5))


def test_empty_init_allocates_without_drawing():
    config = CONFIGS["gpt"]()
    model = Transformer(config, empty_init=True)
    ref = Transformer(config)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert all(p.shape == q.shape for p, q in zip(model.parameters(), ref.parameters(), strict=True))
    assert model.embed.weight[config.vocab_size :].abs().sum() == 0  # padding rows are zero, never loaded
