"""Sharded checkpoints: saved at one world size and layout, loaded at another and in one process."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from megalith.core.checkpoint import (
    LocalShard,
    ModelCheckpointReader,
    ShardSpec,
    load_sharded_state,
    publish_checkpoint,
    read_full_tensors,
    resolve_checkpoint_dir,
    save_sharded_state,
    write_model_checkpoint,
)
from megalith.core.checkpoint.sharded import _flat_range_boxes
from megalith.core.checkpoint.storage import TensorIndex
from tests.harness import run_distributed

H, D, NQ, NKV, V = 6, 2, 4, 2, 10


def full_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        "qkv": torch.randn((NQ + 2 * NKV) * D, H, generator=g),
        "embed": torch.randn(V, H, generator=g),
        "proj": torch.randn(H, NQ * D, generator=g),
        "norm": torch.randn(H, generator=g),
        "fc1": torch.randn(8, H, generator=g),  # held as a tp shard split again into dp flat ranges (ZeRO)
        "step": torch.tensor(7.0),
    }


def local_state(full: dict[str, torch.Tensor], tp: int, tp_rank: int, dp: int, dp_rank: int, fill=None):
    """The shards one rank holds for layout (tp, dp); `fill` replaces the data (for loading into)."""
    out = {}
    # qkv: three parts [Q; K; V] each split over tp, so the local tensor is [Q_r; K_r; V_r] (three pieces).
    start, local_start, pieces, rows = 0, 0, [], []
    for size in [NQ * D, NKV * D, NKV * D]:
        n = size // tp
        pieces.append((local_start, n, start + tp_rank * n))
        rows.append(full["qkv"][start + tp_rank * n : start + (tp_rank + 1) * n])
        start, local_start = start + size, local_start + n
    out["qkv"] = LocalShard(torch.cat(rows), ShardSpec(tuple(full["qkv"].shape), 0, tuple(pieces)))
    # embed: vocabulary padded to a multiple of 4*tp; padding rows are local only.
    padded = math.ceil(V / (4 * tp)) * 4 * tp
    per = padded // tp
    local = torch.zeros(per, H)
    valid = max(0, min(V - tp_rank * per, per))
    local[:valid] = full["embed"][tp_rank * per : tp_rank * per + valid]
    out["embed"] = LocalShard(local, ShardSpec((V, H), 0, ((0, valid, tp_rank * per),) if valid else ()))
    # proj: row-parallel, split along dim 1.
    n = NQ * D // tp
    out["proj"] = LocalShard(
        full["proj"][:, tp_rank * n : (tp_rank + 1) * n].clone(), ShardSpec((H, NQ * D), 1, ((0, n, tp_rank * n),))
    )
    out["norm"] = LocalShard(full["norm"].clone())
    out["step"] = LocalShard(full["step"].clone())
    # fc1: column-parallel over tp, then the flattened local shard split unevenly over dp.
    n = 8 // tp
    tp_local = full["fc1"][tp_rank * n : (tp_rank + 1) * n]
    numel = tp_local.numel()
    bounds = [round(i * numel / dp) + (1 if 0 < i < dp else 0) for i in range(dp + 1)]
    lo, hi = bounds[dp_rank], bounds[dp_rank + 1]
    out["fc1"] = LocalShard(
        tp_local.flatten()[lo:hi].clone(),
        ShardSpec((8, H), 0, ((0, n, tp_rank * n),)),
        flat_range=(lo, hi),
        local_shape=tuple(tp_local.shape),
    )
    if fill is not None:
        for name, shard in out.items():
            (shard.tensor[:valid] if name == "embed" else shard.tensor).fill_(fill)  # padding rows stay zero
    return out


def _save_rank(rank, world_size, path, tp):
    dp = world_size // tp
    save_sharded_state(local_state(full_tensors(), tp, rank % tp, dp, rank // tp), path)


def _load_rank(rank, world_size, path, tp):
    dp = world_size // tp
    expected = local_state(full_tensors(), tp, rank % tp, dp, rank // tp)
    got = local_state(full_tensors(), tp, rank % tp, dp, rank // tp, fill=-99.0)
    load_sharded_state(got, path)
    bad = [name for name in expected if not torch.equal(expected[name].tensor, got[name].tensor)]
    assert not bad, f"rank {rank}: wrong tensors after load: {bad}"
    return True


def _check_full(path):
    full = full_tensors()
    got = read_full_tensors(path, list(full))
    for name, tensor in full.items():
        assert torch.equal(got[name], tensor), name


def test_save_tp2_dp2_load_tp4_and_tp1dp3_and_one_process(tmp_path):
    path = str(tmp_path / "ck")
    run_distributed(_save_rank, 4, path, 2)
    index = TensorIndex.read(Path(path))
    assert len(index.tensors["norm"].chunks) == 1  # replicated on 4 ranks, written once
    assert len(index.tensors["qkv"].chunks) == 6  # 3 pieces x 2 tp ranks, dp replicas deduplicated
    _check_full(path)
    run_distributed(_load_rank, 4, path, 4)
    run_distributed(_load_rank, 3, path, 1)


def test_one_process_save_loads_at_tp2_dp1(tmp_path):
    path = str(tmp_path / "ck")
    save_sharded_state(local_state(full_tensors(), 1, 0, 1, 0), path)
    _check_full(path)
    run_distributed(_load_rank, 2, path, 2)


def test_in_process_layout_changes(tmp_path):
    # Several "ranks" of one layout merged into one process: load each rank's part for other layouts.
    path = str(tmp_path / "ck")
    save_sharded_state(local_state(full_tensors(), 1, 0, 1, 0), path)
    for tp, dp in [(2, 3), (4, 1), (1, 5)]:
        for tp_rank in range(tp):
            for dp_rank in range(dp):
                expected = local_state(full_tensors(), tp, tp_rank, dp, dp_rank)
                got = local_state(full_tensors(), tp, tp_rank, dp, dp_rank, fill=5.0)
                load_sharded_state(got, path)
                for name in expected:
                    assert torch.equal(expected[name].tensor, got[name].tensor), (tp, dp, tp_rank, dp_rank, name)


@pytest.mark.parametrize("shape", [(3, 4, 5), (7,), (2, 1, 3, 2)])
def test_flat_range_boxes_tile_the_range(shape):
    numel = math.prod(shape)
    for start in range(numel):
        for end in range(start, numel + 1):
            covered = torch.zeros(shape, dtype=torch.int64)
            for offsets, sizes in _flat_range_boxes(shape, start, end):
                index = tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))
                covered[index] += 1
            expected = torch.zeros(numel, dtype=torch.int64)
            expected[start:end] = 1
            assert torch.equal(covered.flatten(), expected), (start, end)


def test_errors_name_the_tensor(tmp_path):
    path = str(tmp_path / "ck")
    full = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"w: the shards cover 6 of 12"):
        save_sharded_state({"w": LocalShard(full[:2].clone(), ShardSpec((4, 3), 0, ((0, 2, 0),)))}, path)
    save_sharded_state({"w": full}, path)
    with pytest.raises(
        ValueError, match=r"w: checkpoint shape \(4, 3\) differs from the expected global shape \(5, 3\)"
    ):
        load_sharded_state({"w": torch.zeros(5, 3)}, path)
    with pytest.raises(KeyError, match="no tensor 'x'"):
        load_sharded_state({"x": torch.zeros(4, 3)}, path)
    assert load_sharded_state({"x": torch.zeros(4, 3)}, path, strict=False) == ["x"]
    with pytest.raises(ValueError, match=r"w: piece \(1, 2, 0\) lies outside local size 2"):
        save_sharded_state({"w": LocalShard(torch.zeros(2, 3), ShardSpec((4, 3), 0, ((1, 2, 0),)))}, path)


def test_model_checkpoint_writer_and_reader(tmp_path, monkeypatch):
    import megalith.core.checkpoint.model_io as model_io

    monkeypatch.setattr(model_io, "_BATCH_BYTES", 100)  # several data files
    full = full_tensors()
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.json").write_text("{}")
    out = write_model_checkpoint(tmp_path / "root", {"hidden_size": H}, iter(full.items()), tokenizer_dir=tok)
    assert out.name == "iter_0000000"
    assert len(list(out.glob("*.safetensors"))) > 2
    reader = ModelCheckpointReader(tmp_path / "root")
    assert reader.model_config == {"hidden_size": H}
    assert sorted(reader.tensor_names()) == sorted(full)
    assert (reader.tokenizer_dir / "vocab.json").read_text() == "{}"
    for name, tensor in full.items():
        assert torch.equal(reader.read(name), tensor)
    # The same files load as sharded model state at tp=2.
    got = local_state(full_tensors(), 2, 1, 1, 0, fill=0.0)
    load_sharded_state({"model/" + k: v for k, v in got.items()}, out)
    want = local_state(full_tensors(), 2, 1, 1, 0)
    assert all(torch.equal(got[k].tensor, want[k].tensor) for k in want)
    with pytest.raises(KeyError, match="no model tensor 'nope'"):
        reader.read("nope")


def test_publish_replaces_latest_only_after_rename(tmp_path):
    (tmp_path / "iter_0000005.tmp").mkdir()
    final = publish_checkpoint(tmp_path, 5, {"extra": {}})
    assert (tmp_path / "latest").read_text().strip() == "iter_0000005"
    assert final.is_dir() and not (tmp_path / "iter_0000005.tmp").exists()
    (tmp_path / "iter_0000003").mkdir()  # an older complete one, and an incomplete newer one
    (tmp_path / "iter_0000003" / "megalith.json").write_text('{"step": 3}')
    (tmp_path / "iter_0000009").mkdir()
    assert resolve_checkpoint_dir(tmp_path) == final
    shutil.rmtree(final)  # `latest` names a directory that is gone: fall back to the newest complete one
    assert resolve_checkpoint_dir(tmp_path).name == "iter_0000003"
    shutil.rmtree(tmp_path / "iter_0000003")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint_dir(tmp_path)
