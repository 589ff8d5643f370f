"""An input file that is missing, unreadable or a directory gives one line naming it: '<file>: cannot read (...)'."""

from __future__ import annotations

import builtins
import errno
import json
import os

import pytest
import torch

from megalith.export.cli import export_main, import_main
from megalith.export.hf import export_hf
from megalith.export.io import write_canonical_dir
from megalith.export.mapping import entries
from megalith.export.spec import model_config_from_dict
from tests.export.common import CONFIGS, DictSource, random_tensors

REASONS = {"missing": "No such file or directory", "directory": "Is a directory", "unreadable": "Permission denied"}


def _damage(path, how: str, monkeypatch) -> None:
    if how in ("missing", "directory"):
        path.unlink()
        if how == "directory":
            path.mkdir()
        return
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: make opening it fail as it would for anyone else
        real_open = builtins.open

        def refusing_open(file, *args, **kwargs):
            if os.fspath(file) == os.fspath(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)


@pytest.fixture
def dirs(tmp_path):
    """An HF directory with one file, a sharded one, and a canonical directory, each with tokenizer files."""
    cfg = CONFIGS["llama_gqa"]
    tensors = random_tensors(cfg, seed=9)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"model": "fake"}')
    (tok / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2}')
    single = export_hf(DictSource(cfg, tensors, tok), tmp_path / "hf", dtype=torch.float32, progress=False)
    sharded = export_hf(DictSource(cfg, tensors, tok), tmp_path / "sharded", dtype=torch.float32,
                        max_shard_bytes=60_000, progress=False)  # fmt: skip
    order = [e.canonical for e in entries(model_config_from_dict(cfg))]
    write_canonical_dir(tmp_path / "canon", cfg, ((n, tensors[n]) for n in order), tokenizer_dir=tok)
    return {"hf": single, "sharded": sharded, "canon": tmp_path / "canon"}


def _a_shard(folder) -> str:
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return weight_map["model.layers.2.mlp.up_proj.weight"]


IMPORT_CASES = [
    ("hf", "config.json", ("missing", "directory", "unreadable")),
    ("hf", "model.safetensors", ("directory", "unreadable")),
    ("hf", "tokenizer.json", ("directory", "unreadable")),
    ("sharded", "model.safetensors.index.json", ("directory", "unreadable")),
    ("sharded", "<shard>", ("missing", "directory", "unreadable")),
]


@pytest.mark.parametrize(
    ("folder", "name", "how"), [(f, n, h) for f, n, hows in IMPORT_CASES for h in hows], ids=lambda x: str(x)
)
def test_import(folder, name, how, dirs, tmp_path, capsys, monkeypatch):
    src = dirs[folder]
    path = src / (_a_shard(src) if name == "<shard>" else name)
    _damage(path, how, monkeypatch)
    assert import_main(["hf", "--hf", str(src), "--out", str(tmp_path / "out"), "--format", "canonical"]) == 2
    assert capsys.readouterr().err == f"megalith-import: error: {path}: cannot read ({REASONS[how]})\n"
    assert not (tmp_path / "out").exists()


EXPORT_CASES = [
    ("canon", "megalith.json", ("directory", "unreadable")),
    ("canon", "model.safetensors", ("directory", "unreadable")),
    ("canon", "tokenizer/tokenizer.json", ("directory", "unreadable")),
    ("canon", "tokenizer/generation_config.json", ("directory", "unreadable")),
    ("sharded", "config.json", ("directory", "unreadable")),
    ("sharded", "<shard>", ("missing", "directory", "unreadable")),
]


@pytest.mark.parametrize(
    ("folder", "name", "how"), [(f, n, h) for f, n, hows in EXPORT_CASES for h in hows], ids=lambda x: str(x)
)
def test_export(folder, name, how, dirs, tmp_path, capsys, monkeypatch):
    src = dirs[folder]
    path = src / (_a_shard(src) if name == "<shard>" else name)
    _damage(path, how, monkeypatch)
    assert export_main(["hf", "--load", str(src), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert capsys.readouterr().err == f"megalith-export: error: {path}: cannot read ({REASONS[how]})\n"
    assert not (tmp_path / "out").exists()


VERIFY_CASES = [("config.json", h) for h in REASONS] + [("<shard>", "directory"), ("<shard>", "unreadable")]


@pytest.mark.parametrize(("name", "how"), VERIFY_CASES)
def test_verify(name, how, dirs, capsys, monkeypatch):
    src = dirs["sharded"]
    path = src / (_a_shard(src) if name == "<shard>" else name)
    _damage(path, how, monkeypatch)
    assert export_main(["verify", str(src)]) == 1
    assert f"{path}: cannot read ({REASONS[how]})" in capsys.readouterr().out.splitlines()


def test_a_folder_that_is_no_checkpoint_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert export_main(["hf", "--load", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"megalith-export: error: --load {tmp_path / 'empty'}: ") and err.count("\n") == 1, err
