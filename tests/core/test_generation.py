"""The decoding loop: greedy decoding against full forward passes, batching and padding, sampling filters,
seeded reproducibility."""

from __future__ import annotations

import pytest
import torch

from megalith.core.generation import filter_logits, generate, sample_next_token
from tests.core.parallel_checks import build, gpt_config, llama_config

PROMPTS = [[5, 17, 42, 8, 99, 3, 61], [150, 11], [7, 7, 130, 2]]
CONFIGS = {
    "gpt": lambda **kw: gpt_config(max_seq_len=40, **kw),
    "llama": lambda **kw: llama_config(max_seq_len=40, **kw),
}


def _model(family: str, **overrides):
    return build(CONFIGS[family](**overrides), seed=11, dtype=torch.float64).eval()


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_greedy_equals_argmax_of_full_forward_at_every_step(family):
    model = _model(family)
    outputs = generate(model, PROMPTS, max_new_tokens=12)
    assert [len(o) for o in outputs] == [12, 12, 12]
    vocab = model.config.vocab_size
    with torch.no_grad():
        for prompt, out in zip(PROMPTS, outputs, strict=True):
            for i, token in enumerate(out):  # recompute the whole sequence, no cache
                logits = model(torch.tensor([prompt + out[:i]]))[0, -1, :vocab]
                assert logits.argmax().item() == token
    assert len({t for o in outputs for t in o}) > 3  # not one token repeated everywhere


def test_vocab_limit_keeps_ids_below_it():
    model = _model("gpt")
    outputs = generate(model, PROMPTS, max_new_tokens=6, vocab_limit=50)
    with torch.no_grad():
        for prompt, out in zip(PROMPTS, outputs, strict=True):
            for i, token in enumerate(out):
                assert model(torch.tensor([prompt + out[:i]]))[0, -1, :50].argmax().item() == token


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_of_different_lengths_equals_each_alone(side):
    model = _model("llama")
    batch = generate(model, PROMPTS, max_new_tokens=10, padding_side=side)
    alone = [generate(model, [p], max_new_tokens=10)[0] for p in PROMPTS]
    assert batch == alone


def test_each_sequence_stops_at_its_own_eod():
    model = _model("gpt")
    free = generate(model, PROMPTS, max_new_tokens=10)
    eod = free[0][3]  # a token row 0 produces at step 3; other rows may or may not produce it
    stopped = generate(model, PROMPTS, max_new_tokens=10, eod=eod)
    expected = [out[: out.index(eod) + 1] if eod in out else out for out in free]
    assert stopped == expected
    assert len(stopped[0]) <= 4


def test_top_k_one_equals_greedy():
    model = _model("llama")
    greedy = generate(model, PROMPTS, max_new_tokens=8)
    assert generate(model, PROMPTS, max_new_tokens=8, temperature=1.7, top_k=1, seed=3) == greedy


def test_top_k_and_top_p_restrict_the_support():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3], dtype=torch.float64)
    logits = probs.log()[None]

    def dist(**kw):
        return torch.softmax(filter_logits(logits, **kw), dim=-1)[0]

    expect = torch.testing.assert_close
    expect(dist(top_p=0.75), torch.tensor([0, 0.5 / 0.8, 0, 0.3 / 0.8], dtype=torch.float64))  # 0.5 + 0.3 >= 0.75
    expect(dist(top_p=0.85), torch.tensor([0.15, 0.5, 0, 0.3], dtype=torch.float64) / 0.95)
    expect(dist(top_p=0.3), torch.tensor([0, 1.0, 0, 0], dtype=torch.float64))  # the top token always stays
    expect(dist(top_k=2), torch.tensor([0, 0.5 / 0.8, 0, 0.3 / 0.8], dtype=torch.float64))
    expect(dist(top_k=3, top_p=0.9), torch.tensor([0.15, 0.5, 0, 0.3], dtype=torch.float64) / 0.95)
    # top-p applies to the distribution top-k left: 0.5/0.95 + 0.3/0.95 = 0.84 < 0.9 above, >= 0.8 here
    expect(dist(top_k=3, top_p=0.8), torch.tensor([0, 0.5 / 0.8, 0, 0.3 / 0.8], dtype=torch.float64))
    expect(dist(), probs)
    # Draws follow the filtered distribution: support {1, 3} with frequencies 0.625 / 0.375.
    gen = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits.expand(4000, 4), temperature=1.0, top_p=0.75, generator=gen)
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 1).double().mean().item() - 0.625) < 0.03
    # A temperature flattens: at T=2 the probabilities are proportional to sqrt(p).
    draws = sample_next_token(logits.expand(4000, 4), temperature=2.0, generator=gen)
    sqrt = probs.sqrt() / probs.sqrt().sum()
    assert abs((draws == 2).double().mean().item() - sqrt[2].item()) < 0.03
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        filter_logits(logits, top_p=0.0)
    with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
        sample_next_token(logits, temperature=1.0, top_k=-1)


def test_seeded_sampling_is_reproducible():
    model = _model("gpt")
    kw = dict(max_new_tokens=16, temperature=1.5, top_k=50, top_p=0.95)
    first = generate(model, PROMPTS, seed=7, **kw)
    assert generate(model, PROMPTS, seed=7, **kw) == first
    assert generate(model, PROMPTS, seed=8, **kw) != first
    greedy = generate(model, PROMPTS, max_new_tokens=16)
    assert first != greedy


def test_bad_requests_are_reported():
    model = _model("gpt")
    with pytest.raises(ValueError, match=r"prompt 1 is empty"):
        generate(model, [[1], []])
    with pytest.raises(ValueError, match=r"prompt 0 has token id 200 outside the vocabulary \[0, 200\)"):
        generate(model, [[200]])
    with pytest.raises(ValueError, match=r"longest prompt \(7 tokens\) plus max_new_tokens \(34\) exceeds"):
        generate(model, PROMPTS, max_new_tokens=34)
