"""The command lines: import -> canonical directory -> export, --force, error exits, and peak memory per layer."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from megalith.core import ModelConfig
from megalith.export.cli import export_main, import_main, parse_size
from megalith.export.hf import export_hf
from megalith.export.io import CanonicalDirSource, write_canonical_dir
from tests.export.common import CONFIGS, DictSource, canonical_shapes, random_tensors


@pytest.fixture
def hf_dir(tmp_path):
    cfg = CONFIGS["llama_gqa"]
    tensors = random_tensors(cfg, seed=7)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"model": "fake"}')
    out = export_hf(DictSource(cfg, tensors, tok), tmp_path / "hf", dtype=torch.float32, progress=False,
                    token_ids={"bos_token_id": 1, "eos_token_id": 2})  # fmt: skip
    return out, cfg, tensors


def test_import_then_export_round_trip_through_the_commands(hf_dir, tmp_path, capsys):
    hf, cfg, tensors = hf_dir
    ckpt = tmp_path / "ckpt"
    assert import_main(["hf", "--hf", str(hf), "--out", str(ckpt), "--format", "canonical", "--tp", "2"]) == 0
    source = CanonicalDirSource(ckpt)
    assert ModelConfig.from_dict(source.model_config) == ModelConfig(**cfg)  # the rest at their defaults
    assert (source.tokenizer_dir / "tokenizer.json").read_text() == '{"model": "fake"}'
    for name, original in tensors.items():
        assert torch.equal(source.read(name), original), name

    again = tmp_path / "hf2"
    assert export_main(["hf", "--load", str(ckpt), "--out", str(again), "--dtype", "fp32", "--quiet"]) == 0
    assert load_file(again / "model.safetensors").keys() == load_file(hf / "model.safetensors").keys()
    for name, tensor in load_file(hf / "model.safetensors").items():
        assert torch.equal(load_file(again / "model.safetensors")[name], tensor), name
    assert json.loads((again / "config.json").read_text())["eos_token_id"] == 2
    assert (again / "tokenizer.json").is_file()
    capsys.readouterr()
    assert export_main(["trtllm", "--load", str(ckpt), "--out", str(tmp_path / "trt"), "--tp", "2", "--pp", "2"]) == 0
    progress = capsys.readouterr().err.splitlines()  # one line per tensor group when not on a terminal
    assert [line.split("] ")[1].split(":")[0] for line in progress] == [
        "1/6 embeddings",
        *(f"{k + 2}/6 layer {k}" for k in range(4)),
        "6/6 head",
    ]
    assert export_main(["verify", str(tmp_path / "trt")]) == 0
    assert export_main(["verify", str(again)]) == 0
    assert "OK" in capsys.readouterr().out


def test_existing_output_needs_force_and_failures_keep_the_old_output(hf_dir, tmp_path, capsys):
    hf = hf_dir[0]
    out = tmp_path / "trt"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    args = ["trtllm", "--load", str(hf), "--out", str(out), "--tp", "2", "--quiet"]
    assert export_main(args) == 2
    assert "already exists (pass --force" in capsys.readouterr().err
    assert export_main([*args[:-1], "--tp", "3", "--force"]) == 2  # fails mid-way: old output untouched
    assert "num_attention_heads (8) is not divisible by tp (3)" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "old"
    assert export_main([*args, "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "rank1.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_import_errors_exit_with_a_message(hf_dir, tmp_path, capsys):
    hf = hf_dir[0]
    assert import_main(["hf", "--hf", str(hf), "--out", str(tmp_path / "x"), "--format", "canonical", "--tp", "4"]) == 2
    assert "num_kv_heads (2) is not divisible by tp (4)" in capsys.readouterr().err
    assert import_main(["hf", "--hf", str(tmp_path / "none"), "--out", str(tmp_path / "y")]) == 2
    assert "config.json: cannot read" in capsys.readouterr().err
    assert export_main(["hf", "--load", str(tmp_path / "none"), "--out", str(tmp_path / "z")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size("123") == 123


_MEASURE = textwrap.dedent(
    """
    import sys
    from megalith.export.io import CanonicalDirSource
    from megalith.export.hf import export_hf
    import torch

    def rss(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    source = CanonicalDirSource(sys.argv[1])
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current resident size
    before = rss("VmRSS:")
    export_hf(source, sys.argv[2], dtype=torch.float32, max_shard_bytes=50_000_000, progress=False)
    print(rss("VmHWM:") - before)
    """
)


def test_peak_memory_stays_near_one_layer(tmp_path):
    """A 12-layer model of ~170 MB exports with a peak resident increase of about one layer, not the model."""
    cfg = dict(CONFIGS["llama_gqa"], hidden_size=512, num_attention_heads=8, num_kv_heads=8, ffn_hidden_size=1536,
               num_layers=12, vocab_size=1000)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    shapes = canonical_shapes(cfg)
    write_canonical_dir(tmp_path / "src", cfg, ((n, torch.randn(s, generator=gen)) for n, s in shapes.items()))
    layer_bytes = sum(4 * torch.Size(s).numel() for n, s in shapes.items() if n.startswith("layers.0."))
    model_bytes = sum(4 * torch.Size(s).numel() for s in shapes.values())
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "src"), str(tmp_path / "hf")],
                            capture_output=True, text=True, check=True)  # fmt: skip
    peak = int(result.stdout.strip())
    print(f"model {model_bytes / 1e6:.0f} MB, layer {layer_bytes / 1e6:.1f} MB, peak RSS increase {peak / 1e6:.1f} MB")
    assert model_bytes > 10 * layer_bytes
    assert peak < 1.5 * layer_bytes + 16e6, (
        f"peak RSS grew by {peak / 1e6:.1f} MB for {layer_bytes / 1e6:.1f} MB layers"
    )


def test_export_checks_checkpoint_checksums_unless_told_not_to(tmp_path, capsys):
    from megalith.core import build_model_chunks
    from megalith.core.checkpoint import write_model_checkpoint
    from megalith.export.spec import model_config_from_dict

    config = model_config_from_dict(CONFIGS["llama_gqa"])
    (model,) = build_model_chunks(config)
    ckpt = write_model_checkpoint(tmp_path / "ckpt", config.to_dict(), model.named_parameters())
    data = next(ckpt.glob("*.safetensors"))
    raw = bytearray(data.read_bytes())
    raw[-5] ^= 0x10  # a flipped bit inside the last tensor: still a valid safetensors file
    data.write_bytes(bytes(raw))
    assert export_main(["hf", "--load", str(tmp_path / "ckpt"), "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert f"{data}: corrupt or truncated (CRC32" in capsys.readouterr().err
    argv = ["hf", "--load", str(tmp_path / "ckpt"), "--out", str(tmp_path / "b"), "--quiet", "--verify", "size"]
    assert export_main(argv) == 0
