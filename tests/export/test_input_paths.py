"""Files named by an input folder stay inside it: index entries with `..`, absolute paths or symlinks leading out
are refused (by import, export and verify), while a Hugging Face cache snapshot may link into its repository's blobs.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from megalith.export.cli import export_main, import_main
from megalith.export.hf import export_hf
from megalith.export.io import CanonicalDirSource
from tests.export.common import CONFIGS, DictSource, random_tensors

INDEX = "model.safetensors.index.json"


@pytest.fixture
def sharded(tmp_path):
    """A sharded Llama HF directory, its tensors, and an identical shard copied to a folder beside it."""
    cfg = CONFIGS["llama_gqa"]
    tensors = random_tensors(cfg, seed=11)
    hf = export_hf(DictSource(cfg, tensors), tmp_path / "hf", dtype=torch.float32, max_shard_bytes=60_000,
                   progress=False)  # fmt: skip
    weight_map = json.loads((hf / INDEX).read_text())["weight_map"]
    first = weight_map["model.embed_tokens.weight"]
    (tmp_path / "outside").mkdir()
    shutil.copyfile(hf / first, tmp_path / "outside" / first)
    return hf, tensors, first


def _point_index_at(hf, old: str, new: str) -> None:
    doc = json.loads((hf / INDEX).read_text())
    doc["weight_map"] = {n: new if f == old else f for n, f in doc["weight_map"].items()}
    (hf / INDEX).write_text(json.dumps(doc))
    (hf / old).unlink()


def _errors(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


def _import(hf, out) -> int:
    return import_main(["hf", "--hf", str(hf), "--out", str(out), "--format", "canonical"])


def test_index_entry_with_dotdot_is_refused(sharded, tmp_path, capsys):
    hf, _, first = sharded
    entry = f"../outside/{first}"
    _point_index_at(hf, first, entry)
    message = f"{hf / INDEX}: entry {entry!r} leads outside the folder {hf}"
    assert _import(hf, tmp_path / "ckpt") == 2
    assert _errors(capsys) == [f"megalith-import: error: {message}"]
    assert export_main(["trtllm", "--load", str(hf), "--out", str(tmp_path / "trt"), "--quiet"]) == 2
    assert _errors(capsys) == [f"megalith-export: error: {message}"]
    assert export_main(["verify", str(hf)]) == 1
    assert message in capsys.readouterr().out
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "trt").exists()


def test_index_entry_with_an_absolute_path_is_refused(sharded, tmp_path, capsys):
    hf, _, first = sharded
    entry = str(tmp_path / "outside" / first)
    _point_index_at(hf, first, entry)
    assert _import(hf, tmp_path / "ckpt") == 2
    assert _errors(capsys) == [f"megalith-import: error: {hf / INDEX}: entry {entry!r} leads outside the folder {hf}"]


def test_index_entry_through_a_symlink_leading_out_is_refused(sharded, tmp_path, capsys):
    hf, _, first = sharded
    (hf / "linked.safetensors").symlink_to(tmp_path / "outside" / first)
    _point_index_at(hf, first, "linked.safetensors")
    target = tmp_path / "outside" / first
    message = f"{hf / INDEX}: entry 'linked.safetensors' resolves to {target}, outside the folder {hf}"
    assert _import(hf, tmp_path / "ckpt") == 2
    assert _errors(capsys) == [f"megalith-import: error: {message}"]
    # A symlinked sub-folder is followed the same way.
    (hf / "sub").symlink_to(tmp_path / "outside", target_is_directory=True)
    _point_index_at(hf, "linked.safetensors", f"sub/{first}")
    assert _import(hf, tmp_path / "ckpt") == 2
    assert f"entry 'sub/{first}' resolves to {target}, outside the folder {hf}" in _errors(capsys)[0]


def test_symlinks_inside_the_folder_and_a_hub_cache_snapshot_are_read(sharded, tmp_path, capsys):
    hf, tensors, first = sharded
    (hf / "shards").mkdir()
    (hf / first).rename(hf / "shards" / first)
    (hf / "alias.safetensors").symlink_to(hf / "shards" / first)
    doc = json.loads((hf / INDEX).read_text())
    doc["weight_map"] = {n: "alias.safetensors" if f == first else f for n, f in doc["weight_map"].items()}
    (hf / INDEX).write_text(json.dumps(doc))
    assert _import(hf, tmp_path / "ckpt") == 0
    # huggingface_hub's cache: <repo>/snapshots/<revision>/<file> are links to <repo>/blobs/<hash>.
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for k, path in enumerate(sorted(hf.rglob("*"))):
        if path.is_file() and not path.is_symlink() and path.parent == hf:
            (repo / "blobs" / f"blob{k}").write_bytes(path.read_bytes())
            (snapshot / path.name).symlink_to(os.path.relpath(repo / "blobs" / f"blob{k}", snapshot))
    (repo / "blobs" / "shard").write_bytes((hf / "shards" / first).read_bytes())
    (snapshot / "alias.safetensors").symlink_to(os.path.relpath(repo / "blobs" / "shard", snapshot))
    assert _import(snapshot, tmp_path / "from_cache") == 0, capsys.readouterr().err
    source = CanonicalDirSource(tmp_path / "from_cache")
    for name, original in tensors.items():
        assert torch.equal(source.read(name), original), name
