"""Text generation: greedy decoding against full forward passes, batching and padding, sampling filters,
seeded reproducibility, tp=2 against tp=1, and megalith-generate end to end on a checkpoint with a BPE tokenizer."""

from __future__ import annotations

import base64
import json

import pytest
import torch

from megalith.core.checkpoint import write_model_checkpoint
from megalith.core.models import Transformer
from megalith.core.parallel.layers import canonical_from_local
from megalith.training.generation import (
    filter_logits,
    generate,
    generate_from_checkpoint,
    load_tokenizer,
    main,
    sample_next_token,
)
from tests.core.parallel_checks import gpt_config, llama_config
from tests.harness import run_distributed

PROMPTS = [[5, 17, 42, 8, 99, 3, 61], [150, 11], [7, 7, 130, 2]]
CONFIGS = {
    "gpt": lambda **kw: gpt_config(max_seq_len=40, **kw),
    "llama": lambda **kw: llama_config(max_seq_len=40, **kw),
}


def _model(family: str, **overrides) -> Transformer:
    return Transformer(CONFIGS[family](**overrides), seed=11, dtype=torch.float64).eval()


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


# ------------------------------------------------------------------------------- checkpoints and the CLI

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "the quick brown fox jumps over the lazy dog. " * 3,
    "for item in items:\n    print(item)\n",
    "import os\nimport sys\nprint(os.getcwd(), sys.argv)\n",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint root of a tiny Llama (GQA) whose tokenizer is a byte-level BPE trained here."""
    from megalith.data.tokenizer_cli import train_bpe

    root = tmp_path_factory.mktemp("gen")
    tok_dir = train_bpe(TEXTS * 4, 300, root / "tok", min_frequency=1)
    tokenizer = load_tokenizer(tok_dir)
    assert tokenizer.vocab_size < 320
    config = llama_config(vocab_size=320, max_seq_len=48)  # more ids than the tokenizer: they are never produced
    model = Transformer(config, seed=21)
    tensors = (
        (n, canonical_from_local(p.data, getattr(p, "megalith_shard", None))) for n, p in model.named_parameters()
    )
    write_model_checkpoint(root / "ckpt", config.to_dict(), tensors, tokenizer_dir=tok_dir)
    return root / "ckpt", model.eval(), tokenizer


CLI_PROMPTS = ["def add(", "the quick", "import"]


def _expected(model, tokenizer, prompts, **kw) -> list[str]:
    new = generate(model, tokenizer.encode_batch(prompts), eod=tokenizer.eod, vocab_limit=tokenizer.vocab_size, **kw)
    return [tokenizer.decode([t for t in ids if t != tokenizer.eod]) for ids in new]


def test_generate_from_checkpoint_matches_the_saved_model(checkpoint):
    root, model, tokenizer = checkpoint
    expected = _expected(model, tokenizer, CLI_PROMPTS, max_new_tokens=10)
    assert sum(len(e) for e in expected) > 0
    assert generate_from_checkpoint(root, CLI_PROMPTS, max_new_tokens=10) == expected  # via `latest`
    iter_dir = root / (root / "latest").read_text().strip()
    got = generate_from_checkpoint(iter_dir, CLI_PROMPTS, max_new_tokens=10, temperature=0.8, top_p=0.9, seed=4)
    assert got == _expected(model, tokenizer, CLI_PROMPTS, max_new_tokens=10, temperature=0.8, top_p=0.9, seed=4)


def _tp_rank(rank, world_size, root):
    greedy = generate_from_checkpoint(root, CLI_PROMPTS, max_new_tokens=10, dtype=torch.float64)
    sampled = generate_from_checkpoint(
        root, CLI_PROMPTS, max_new_tokens=10, temperature=1.0, top_k=40, seed=5, dtype=torch.float64
    )
    replicas = generate_from_checkpoint(root, CLI_PROMPTS, max_new_tokens=10, tp=1, dtype=torch.float64)
    return greedy, sampled, replicas


def test_tp2_generation_equals_tp1(checkpoint):
    root = checkpoint[0]
    greedy = generate_from_checkpoint(root, CLI_PROMPTS, max_new_tokens=10, dtype=torch.float64)
    sampled = generate_from_checkpoint(
        root, CLI_PROMPTS, max_new_tokens=10, temperature=1.0, top_k=40, seed=5, dtype=torch.float64
    )
    assert greedy != sampled
    # tp=2, and two tp=1 replicas in the same 2-rank world
    assert run_distributed(_tp_rank, 2, str(root)) == [(greedy, sampled, greedy)] * 2
    with pytest.raises(ValueError, match=r"tp=2 needs a world of a multiple of 2 processes, found 1"):
        generate_from_checkpoint(root, CLI_PROMPTS, tp=2)


def test_cli_end_to_end(checkpoint, tmp_path, capsys):
    root, model, tokenizer = checkpoint
    expected = _expected(model, tokenizer, CLI_PROMPTS, max_new_tokens=6)
    out = tmp_path / "out" / "gen.jsonl"
    argv = ["--load", str(root), "--max-new-tokens", "6", "--output", str(out), "--batch-size", "2"]
    assert main(argv + [arg for p in CLI_PROMPTS for arg in ("--prompt", p)]) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == [{"prompt": p, "completion": c} for p, c in zip(CLI_PROMPTS, expected, strict=True)]
    for p, c in zip(CLI_PROMPTS, expected, strict=True):
        assert p + c in printed
    # A prompts file (text, then JSON lines) gives the same.
    text_file = tmp_path / "prompts.txt"
    text_file.write_text("\n".join(CLI_PROMPTS) + "\n\n")
    assert (
        main(["--load", str(root), "--prompts-file", str(text_file), "--max-new-tokens", "6", "--output", str(out)])
        == 0
    )
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in CLI_PROMPTS))
    assert main(["--load", str(root), "--prompts-file", str(jsonl), "--max-new-tokens", "6", "--output", str(out)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    capsys.readouterr()
    # Errors name what is wrong.
    assert main(["--load", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "nothing" in capsys.readouterr().err
    assert main(["--load", str(root), "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
    assert main(["--load", str(root), "--prompt", "x", "--max-new-tokens", "100"]) == 2
    assert "exceeds the model's max_seq_len (48)" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n[1, 2]\n')
    assert main(["--load", str(root), "--prompts-file", str(bad)]) == 2
    assert 'bad.jsonl:2: expected an object with a string "prompt"' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--load", str(root)])  # neither --prompt nor --prompts-file


def test_tokenizer_kind_is_recognised_or_reported(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer/ folder; name one with --tokenizer-type"):
        load_tokenizer(None)
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(ValueError, match=r"cannot tell the tokenizer kind from its files \['vocab.txt'\]"):
        load_tokenizer(tmp_path)
    assert load_tokenizer(None, "ByteTokenizer").eod == 256
    # One *.tiktoken ranks file (here: the 256 single bytes) is recognised as a tiktoken BPE.
    ranks = "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256))
    (tmp_path / "bytes.tiktoken").write_text(ranks)
    tok = load_tokenizer(tmp_path)
    assert tok.encode("hi") == [ord("h"), ord("i")]
    assert tok.eod == 256


def test_gpt2_vocab_and_merges_folder_is_recognised(tmp_path):
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {char: i for i, char in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["hi"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh i\n")
    tok = load_tokenizer(tmp_path)
    assert type(tok).__name__ == "GPT2BPETokenizer"
    assert tok.encode("hi hx") == [vocab["hi"], vocab["Ġ"], vocab["h"], vocab["x"]]
    assert tok.eod == vocab["<|endoftext|>"]
