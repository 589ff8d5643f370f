"""Hostile and corrupt checkpoints: nothing is ever unpickled, every file is checked, paths stay inside."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from megalith.core.checkpoint import (
    CheckpointCorruptError,
    LocalShard,
    ModelCheckpointReader,
    ShardSpec,
    load_sharded_state,
    read_full_tensors,
    read_info,
    read_tensor_metadata,
    save_sharded_state,
    write_model_checkpoint,
)
from megalith.core.checkpoint.storage import INDEX_FILE, dumps_checked, file_crc32, write_safetensors
from tests.harness import run_distributed

# Every global the restricted unpickler of Megalith 0.1 handed out for DCP's `.metadata` file.
FORMER_ALLOWED_GLOBALS = [
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "layout"),
    ("torch", "memory_format"),
    ("torch", "strided"),
    ("torch", "contiguous_format"),
    ("torch", "preserve_format"),
    ("torch", "float32"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("builtins", "getattr"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
]


class _Pickle:
    """Assembles protocol-2 pickles from expressions: ("g", module, name), ("attr", e, name), ("call", e, args),
    ("item", e, key), or a plain str. Attribute access goes through builtins.getattr, as the attack did."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")

    def emit(self, e) -> None:
        if isinstance(e, str):
            data = e.encode()
            self.out += b"X" + len(data).to_bytes(4, "little") + data
        elif e[0] == "g":
            self.out += b"c" + f"{e[1]}\n{e[2]}\n".encode()
        elif e[0] == "attr":
            self.emit(("call", ("g", "builtins", "getattr"), [e[1], e[2]]))
        elif e[0] == "item":
            self.emit(("call", ("attr", e[1], "__getitem__"), [e[2]]))
        elif e[0] == "call":
            self.emit(e[1])
            self.out += b"("
            for arg in e[2]:
                self.emit(arg)
            self.out += b"tR"

    @classmethod
    def build(cls, e) -> bytes:
        p = cls()
        p.emit(e)
        return bytes(p.out + b".")


def hostile_payloads(marker: Path) -> dict[str, bytes]:
    """Pickles that would run `touch <marker>-<i>` through attribute chains on each formerly allowed global.

    The chains reach `__import__("os").system` through a function's `__globals__` (the global's `__init__`,
    `__new__`, `__reduce__`, or its class's `__init__`) or through `getattr.__self__` (the builtins module); a
    `__subclasses__` walk returns every class in the process (the usual gadget hunt).
    """
    payloads: dict[str, bytes] = {}

    def run(os_module, tag: str) -> None:
        cmd = f"touch {marker}-{len(payloads)}"
        payloads[tag] = _Pickle.build(("call", ("attr", os_module, "system"), [cmd]))

    for module, name in FORMER_ALLOWED_GLOBALS:
        g = ("g", module, name)
        for chain in ("__init__", "__new__", "__reduce__", "__class__.__init__"):
            func = g
            for attr in chain.split("."):
                func = ("attr", func, attr)
            builtins_dict = ("item", ("attr", func, "__globals__"), "__builtins__")
            run(("call", ("item", builtins_dict, "__import__"), ["os"]), f"{module}.{name}.{chain}.__globals__")
        base = ("item", ("attr", ("attr", g, "__class__"), "__mro__"), "__len__")  # not live: shows refusal only
        payloads[f"{module}.{name}.__class__.__mro__.__subclasses__"] = _Pickle.build(
            ("call", ("attr", ("attr", base, "__class__"), "__subclasses__"), [])
        )
    builtins_module = ("attr", ("g", "builtins", "getattr"), "__self__")
    run(("call", ("attr", builtins_module, "__import__"), ["os"]), "builtins.getattr.__self__.__import__")
    return payloads


def _live(payloads: dict[str, bytes], marker: Path, tmp_path: Path) -> set[str]:
    """The payloads that do run their command under a plain unpickler (checked in a child process)."""
    files = []
    for i, data in enumerate(payloads.values()):
        files.append(tmp_path / f"payload-{i}.pkl")
        files[-1].write_bytes(data)
    script = (
        "import pickle, sys\n"
        "for f in sys.argv[1:]:\n"
        "    try:\n"
        "        pickle.loads(open(f, 'rb').read())\n"
        "    except Exception:\n"
        "        pass\n"
    )
    subprocess.run([sys.executable, "-c", script, *map(str, files)], check=True, capture_output=True, timeout=120)
    live = {tag for i, tag in enumerate(payloads) if Path(f"{marker}-{i}").exists()}
    for i in range(len(payloads)):
        Path(f"{marker}-{i}").unlink(missing_ok=True)
    return live


def _checkpoint(root: Path, model_config: dict | None = None) -> Path:
    """A small model-only checkpoint (the kind `megalith-import hf` writes)."""
    g = torch.Generator().manual_seed(0)
    tensors = {"embed.weight": torch.randn(16, 4, generator=g), "final_norm.weight": torch.ones(4)}
    return write_model_checkpoint(root, model_config or {"hidden_size": 4}, tensors.items())


def _loaders(ckpt: Path) -> dict:
    """Every way a checkpoint's tensors are read."""
    return {
        "read_tensor_metadata": lambda: read_tensor_metadata(ckpt),
        "load_sharded_state": lambda: load_sharded_state({"model/final_norm.weight": torch.zeros(4)}, ckpt),
        "read_full_tensors": lambda: read_full_tensors(ckpt, ["model/final_norm.weight"]),
        "ModelCheckpointReader": lambda: ModelCheckpointReader(ckpt).read("final_norm.weight"),
    }


def test_hostile_pickles_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    payloads = hostile_payloads(marker)
    live = _live(payloads, marker, tmp_path)
    # The attack is real: under a plain unpickler these chains run a command (getattr alone reaches builtins).
    assert "builtins.getattr.__self__.__import__" in live
    assert "pathlib.PosixPath.__new__.__globals__" in live
    assert "torch.distributed.checkpoint.metadata.Metadata.__init__.__globals__" in live
    ckpt = _checkpoint(tmp_path / "root")
    good_index = (ckpt / INDEX_FILE).read_bytes()
    for tag, payload in payloads.items():
        # As Megalith 0.1 wrote it: a DCP `.metadata` pickle and no index.
        (ckpt / INDEX_FILE).unlink(missing_ok=True)
        (ckpt / ".metadata").write_bytes(payload)
        for loader, load in _loaders(ckpt).items():
            with pytest.raises(CheckpointCorruptError, match=r"\.metadata: .*never unpickles"):
                load()
            assert not list(tmp_path.glob("pwned-*")), (tag, loader)
        (ckpt / ".metadata").unlink()
        # In place of the JSON index, and in place of a data file listed by a (forged, self-consistent) index.
        (ckpt / INDEX_FILE).write_bytes(payload)
        for loader, load in _loaders(ckpt).items():
            with pytest.raises(CheckpointCorruptError, match=r"index\.json: corrupt or truncated \(invalid JSON"):
                load()
            assert not list(tmp_path.glob("pwned-*")), (tag, loader)
        (ckpt / INDEX_FILE).write_bytes(good_index)
    data_file = next(ckpt.glob("*.safetensors"))
    for tag in sorted(live):
        _forge(ckpt, data_file, payloads[tag])
        for loader, load in _loaders(ckpt).items():
            if loader == "read_tensor_metadata":
                continue  # reads the index only
            with pytest.raises(CheckpointCorruptError, match=rf"{data_file.name}: corrupt or truncated"):
                load()
            assert not list(tmp_path.glob("pwned-*")), (tag, loader)


def _forge(ckpt: Path, data_file: Path, content: bytes) -> None:
    """Replaces a data file and rewrites the index's manifest entry so size and CRC32 match (as an attacker can)."""
    data_file.write_bytes(content)
    index = json.loads((ckpt / INDEX_FILE).read_text())
    for record in index["files"]:
        if record["name"] == data_file.name:
            record["size"], record["crc32"] = len(content), f"{zlib.crc32(content):08x}"
    (ckpt / INDEX_FILE).write_text(dumps_checked(index))


def test_loading_never_calls_an_unpickler(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path / "root")
    full = torch.arange(12.0).view(4, 3)
    save_sharded_state({"w": LocalShard(full.clone())}, tmp_path / "sharded")

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled something")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for load in _loaders(ckpt).values():
        load()
    got = torch.zeros(2, 3)
    load_sharded_state({"w": LocalShard(got, ShardSpec((4, 3), 0, ((0, 2, 2),)))}, tmp_path / "sharded")
    assert torch.equal(got, full[2:])
    assert read_info(ckpt)["step"] == 0


def _sharded(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    full = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "sharded"
    save_sharded_state({"w": LocalShard(full.clone()), "b": torch.arange(5.0)}, path)
    return path, full


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_data_file_are_detected(tmp_path):
    path, full = _sharded(tmp_path)
    (data_file,) = path.glob("*.safetensors")
    _flip(data_file, data_file.stat().st_size - 100)  # inside w's payload: still a valid safetensors file
    with pytest.raises(CheckpointCorruptError, match=rf"{data_file.name}: corrupt or truncated \(CRC32 [0-9a-f]{{8}}"):
        load_sharded_state({"w": torch.zeros(64, 32)}, path)
    with pytest.raises(CheckpointCorruptError, match="CRC32"):
        read_full_tensors(path, ["w"])
    # verify="size" is the documented fast path: it checks sizes only, so this flip goes unseen.
    got = torch.zeros(64, 32)
    load_sharded_state({"w": got}, path, verify="size")
    assert (got != full).sum() == 1


@pytest.mark.parametrize("damage", ["truncate", "zero_header", "extend"])
def test_damaged_data_files_are_named(tmp_path, damage):
    path, _ = _sharded(tmp_path)
    (data_file,) = path.glob("*.safetensors")
    data = data_file.read_bytes()
    if damage == "truncate":
        data_file.write_bytes(data[:-7])
    elif damage == "zero_header":
        data_file.write_bytes(bytes(64) + data[64:])
    else:
        data_file.write_bytes(data + b"\0")
    for verify in ("checksum", "size"):
        with pytest.raises(CheckpointCorruptError, match=rf"{data_file.name}: corrupt or truncated"):
            load_sharded_state({"w": torch.zeros(64, 32)}, path, verify=verify)


def test_damaged_json_files_are_named(tmp_path):
    ckpt = _checkpoint(tmp_path / "root")
    index, info = ckpt / INDEX_FILE, ckpt / "megalith.json"
    good_index, good_info = index.read_bytes(), info.read_bytes()
    index.write_bytes(good_index[: len(good_index) // 2])
    with pytest.raises(CheckpointCorruptError, match=r"index\.json: corrupt or truncated \(invalid JSON"):
        ModelCheckpointReader(ckpt)
    assert b'"shape":[16,4]' in good_index
    index.write_bytes(good_index.replace(b'"shape":[16,4]', b'"shape":[17,4]'))
    with pytest.raises(CheckpointCorruptError, match=r"index\.json: corrupt or truncated \(content CRC32"):
        ModelCheckpointReader(ckpt)
    index.write_bytes(good_index)
    assert b'"step":0' in good_info
    info.write_bytes(good_info.replace(b'"step":0', b'"step":8'))
    with pytest.raises(CheckpointCorruptError, match=r"megalith\.json: corrupt or truncated \(content CRC32"):
        ModelCheckpointReader(ckpt)
    info.write_bytes(b"\0" * len(good_info))
    with pytest.raises(CheckpointCorruptError, match=r"megalith\.json: corrupt or truncated"):
        ModelCheckpointReader(ckpt)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "a/../../b.safetensors", ".."])
def test_index_entries_must_stay_inside_the_checkpoint(tmp_path, name):
    path, _ = _sharded(tmp_path)
    (data_file,) = path.glob("*.safetensors")
    (tmp_path / "outside.safetensors").write_bytes(data_file.read_bytes())
    index = json.loads((path / INDEX_FILE).read_text())
    index["files"][0]["name"] = name
    for entry in index["tensors"].values():
        entry["chunks"] = [[name, *rest] for _, *rest in entry["chunks"]]
    (path / INDEX_FILE).write_text(dumps_checked(index))
    with pytest.raises(CheckpointCorruptError, match=r"index\.json: refusing file name .* must stay inside"):
        load_sharded_state({"w": torch.zeros(64, 32)}, path)


def test_symlinked_data_files_are_refused(tmp_path):
    path, _ = _sharded(tmp_path)
    (data_file,) = path.glob("*.safetensors")
    outside = tmp_path / "elsewhere.safetensors"
    data_file.rename(outside)
    data_file.symlink_to(outside)
    with pytest.raises(CheckpointCorruptError, match="a symbolic link"):
        load_sharded_state({"w": torch.zeros(64, 32)}, path)


def _load_corrupt_rank(rank, world_size, path):
    try:
        load_sharded_state({"w": LocalShard(torch.zeros(64, 32))}, path)
    except CheckpointCorruptError as exc:
        return str(exc)
    return None


def test_every_rank_reports_a_corrupt_file_that_one_rank_summed(tmp_path):
    path = tmp_path / "sharded"
    full = torch.randn(64, 32)
    save_sharded_state({"w": LocalShard(full.clone()), "b": torch.arange(5.0)}, path, max_file_bytes=1000)
    files = sorted(path.glob("*.safetensors"))
    assert len(files) >= 2
    _flip(files[-1], files[-1].stat().st_size - 3)
    messages = run_distributed(_load_corrupt_rank, 3, str(path))
    assert all(m is not None and files[-1].name in m for m in messages), messages
    assert sum("CRC32 " in m for m in messages) >= 1  # the rank that summed the file gives the two sums


def test_files_written_here_are_read_by_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file

    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7, dtype=torch.float64).to(torch.bfloat16),
        "c": torch.tensor(3),
        "d": torch.zeros(0, 4),
        "e": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "f": torch.randn(6, 4)[::2],  # not contiguous
    }
    path = tmp_path / "x.safetensors"
    record = write_safetensors(path, tensors)
    assert record.size == path.stat().st_size
    assert record.crc32 == file_crc32(path) == zlib.crc32(path.read_bytes())
    got = load_file(path)
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
