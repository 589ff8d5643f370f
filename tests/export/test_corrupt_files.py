"""Corrupt or truncated safetensors files give one-line errors (exit 2) from every command, never a traceback."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from megalith.export.cli import export_main, import_main
from megalith.export.hf import export_hf
from megalith.export.io import CanonicalDirSource, write_canonical_dir
from megalith.export.mapping import entries
from megalith.export.spec import ConversionError, model_config_from_dict
from tests.export.common import CONFIGS, DictSource, random_tensors


def _split(raw: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _last_tensor(header: dict) -> str:
    return max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][1])


def _offsets_outside(raw: bytes) -> bytes:
    header, data = _split(raw)
    name = _last_tensor(header)
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 4096, end + 4096]
    return _join(header, data)


def _dtype_mismatch(raw: bytes) -> bytes:
    header, data = _split(raw)
    header[_last_tensor(header)]["dtype"] = "F16"  # half the bytes the range holds
    return _join(header, data)


def _shape_mismatch(raw: bytes) -> bytes:
    header, data = _split(raw)
    entry = header[_last_tensor(header)]
    entry["shape"] = [entry["shape"][0] + 1, *entry["shape"][1:]]
    return _join(header, data)


def _zeroed_header_text(raw: bytes) -> bytes:
    (length,) = struct.unpack("<Q", raw[:8])
    return raw[:8] + bytes(length) + raw[8 + length :]


CORRUPTIONS = {
    "truncated": lambda raw: raw[: len(raw) - 100],
    "zeroed_header": lambda raw: bytes(8) + raw[8:],
    "zeroed_header_text": _zeroed_header_text,
    "header_longer_than_file": lambda raw: struct.pack("<Q", len(raw)) + raw[8:],
    "offsets_outside_the_data": _offsets_outside,
    "dtype_inconsistent_with_bytes": _dtype_mismatch,
    "shape_inconsistent_with_bytes": _shape_mismatch,
    "empty": lambda raw: b"",
}


def _corrupt(path, how: str) -> None:
    path.write_bytes(CORRUPTIONS[how](path.read_bytes()))


def _one_error(capsys, prog: str, file) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"{prog}: error: {file}: corrupt or truncated (") and err.endswith(")\n"), err
    return err


@pytest.fixture
def model(tmp_path):
    cfg = CONFIGS["gpt_untied"]
    tensors = random_tensors(cfg, seed=5)
    hf = export_hf(DictSource(cfg, tensors), tmp_path / "hf", dtype=torch.float32, progress=False)
    order = [e.canonical for e in entries(model_config_from_dict(cfg))]
    write_canonical_dir(tmp_path / "canon", cfg, ((n, tensors[n]) for n in order))
    return hf, tmp_path / "canon"


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_import_of_a_corrupt_file_is_a_one_line_error(how, model, tmp_path, capsys):
    hf = model[0]
    _corrupt(hf / "model.safetensors", how)
    assert import_main(["hf", "--hf", str(hf), "--out", str(tmp_path / "ckpt"), "--format", "canonical"]) == 2
    _one_error(capsys, "megalith-import", hf / "model.safetensors")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_export_of_a_corrupt_file_is_a_one_line_error(how, model, tmp_path, capsys):
    hf, canon = model
    _corrupt(canon / "model.safetensors", how)
    assert export_main(["hf", "--load", str(canon), "--out", str(tmp_path / "a"), "--quiet"]) == 2
    _one_error(capsys, "megalith-export", canon / "model.safetensors")
    _corrupt(hf / "model.safetensors", how)
    assert export_main(["trtllm", "--load", str(hf), "--out", str(tmp_path / "b"), "--quiet"]) == 2
    _one_error(capsys, "megalith-export", hf / "model.safetensors")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_verify_reports_a_corrupt_file(model, capsys):
    hf = model[0]
    _corrupt(hf / "model.safetensors", "truncated")
    assert export_main(["verify", str(hf)]) == 1
    assert f"{hf / 'model.safetensors'}: corrupt or truncated (" in capsys.readouterr().out


def test_a_file_truncated_after_it_was_opened_is_an_error_not_a_crash(model):
    canon = model[1]
    source = CanonicalDirSource(canon)
    raw = (canon / "model.safetensors").read_bytes()
    (canon / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ConversionError, match="corrupt or truncated"):
        source.read("output.weight")
    with pytest.raises(ConversionError, match="corrupt or truncated"):
        source.read("embed.weight", rows=slice(0, 4))
