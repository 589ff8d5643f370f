"""megalith-generate: a checkpoint with a BPE tokenizer end to end, tp=2 against tp=1, tokenizer recognition."""

from __future__ import annotations

import base64
import json

import pytest
import torch

from megalith.core.checkpoint import write_model_checkpoint
from megalith.core.generation import generate
from megalith.export.generate import generate_from_checkpoint, load_tokenizer, main
from tests.core.parallel_checks import build, llama_config
from tests.harness import run_distributed

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
    model = build(config, seed=21)
    tensors = ((n, p.data) for n, p in model.named_parameters())  # one process: canonical already
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
