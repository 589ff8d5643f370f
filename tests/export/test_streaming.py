"""Row-block streaming of the embedding and output matrices: the files written from a source that reads row ranges
(a canonical directory) are byte-identical to those written from whole tensors (an in-memory source), with blocks
small enough that every vocabulary tensor takes several, unevenly split over the TensorRT-LLM ranks."""

from __future__ import annotations

import pytest
import torch

import megalith.export.io as export_io
from megalith.export.hf import export_hf
from megalith.export.io import CanonicalDirSource, reads_rows, row_blocks, write_canonical_dir
from megalith.export.mapping import entries
from megalith.export.safetensors_io import SafetensorsReader, SafetensorsWriter
from megalith.export.spec import model_config_from_dict
from megalith.export.trtllm import export_trtllm
from tests.export.common import CONFIGS, DictSource, random_tensors


class _CountingSource(CanonicalDirSource):
    def __init__(self, path):
        super().__init__(path)
        self.row_reads: list[str] = []

    def read(self, name, rows=None):
        if rows is not None:
            self.row_reads.append(name)
        elif name in ("embed.weight", "output.weight"):
            raise AssertionError(f"{name} read whole")
        return super().read(name, rows=rows)


def _files(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.suffix == ".safetensors"}


@pytest.mark.parametrize("name", ["gpt_tied", "llama_gqa"])
def test_row_streamed_exports_equal_whole_tensor_exports(name, tmp_path, monkeypatch):
    cfg = CONFIGS[name]
    tensors = random_tensors(cfg)
    order = [e.canonical for e in entries(model_config_from_dict(cfg))]
    write_canonical_dir(tmp_path / "src", cfg, ((n, tensors[n]) for n in order))
    streamed, whole = _CountingSource(tmp_path / "src"), DictSource(cfg, tensors)
    assert reads_rows(streamed) and not reads_rows(whole)
    # 7 rows of bf16 per block: 103 / 101 rows take 15 blocks, crossing every tp boundary at tp 2 and 4.
    monkeypatch.setattr(export_io, "ROW_BLOCK_BYTES", 7 * cfg["hidden_size"] * 2)
    export_hf(streamed, tmp_path / "hf_s", progress=False)
    export_hf(whole, tmp_path / "hf_w", progress=False)
    assert _files(tmp_path / "hf_s") == _files(tmp_path / "hf_w")
    vocab = [n for n in ("embed.weight", "output.weight") if n in tensors]
    assert sorted(streamed.row_reads) == sorted(vocab * 15)  # read only in row blocks, never whole
    for tp, pp in ((2, 1), (4, 2)):
        export_trtllm(streamed, tmp_path / f"trt_s{tp}{pp}", tp=tp, pp=pp, progress=False)
        export_trtllm(whole, tmp_path / f"trt_w{tp}{pp}", tp=tp, pp=pp, progress=False)
        got, want = _files(tmp_path / f"trt_s{tp}{pp}"), _files(tmp_path / f"trt_w{tp}{pp}")
        assert got.keys() == want.keys() and len(got) == tp * pp
        for file in got:
            assert got[file] == want[file], (tp, pp, file)


def test_row_blocks_and_row_reads(tmp_path):
    assert row_blocks(10, 4, 12) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert row_blocks(2, 100, 1) == [(0, 1), (1, 2)]
    t = torch.randn(9, 4)
    writer = SafetensorsWriter(tmp_path / "x.safetensors", [("t", torch.float32, (9, 4))])
    writer.write_rows("t", 5, t[5:])
    with pytest.raises(ValueError, match="do not fit"):
        writer.write_rows("t", 6, t[:5])
    writer.write_rows("t", 0, t[:5])
    writer.close()
    reader = SafetensorsReader(tmp_path / "x.safetensors")
    assert torch.equal(reader.read("t"), t)
    assert torch.equal(reader.read("t", rows=slice(2, 7)), t[2:7])
    assert torch.equal(reader.read("t", rows=slice(7, 100)), t[7:])
    assert reader.read("t", rows=slice(5, 3)).shape == (0, 4)


def test_unfinished_row_writes_are_reported(tmp_path):
    writer = SafetensorsWriter(tmp_path / "x.safetensors", [("t", torch.float32, (9, 4))])
    writer.write_rows("t", 0, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="never written"):
        writer.close()


def test_checkpoint_row_reads(tmp_path):
    from megalith.core.checkpoint import model_io

    cfg = CONFIGS["llama_gqa"]
    tensors = {n: t.to(torch.bfloat16) for n, t in random_tensors(cfg).items()}
    model_io.write_model_checkpoint(tmp_path / "ckpt", cfg, tensors.items())
    reader = model_io.ModelCheckpointReader(tmp_path / "ckpt")
    for name in ("embed.weight", "output.weight", "layers.0.attn.qkv.weight", "final_norm.weight"):
        for rows in (slice(0, 5), slice(17, 64), slice(60, None), slice(-3, None)):
            got = reader.read(name, rows=rows)
            assert got.dtype == torch.bfloat16 and torch.equal(got, tensors[name][rows]), (name, rows)
    with pytest.raises(ValueError, match="step 1"):
        reader.read("embed.weight", rows=slice(0, 10, 2))
