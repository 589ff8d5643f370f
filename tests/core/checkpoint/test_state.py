"""Model and AdamW state saved from a 2-rank tensor-parallel layout, loaded into one unsharded process."""

from __future__ import annotations

import torch
from torch import nn

from megalith.core.checkpoint import (
    ShardSpec,
    load_sharded_state,
    model_sharded_state,
    optimizer_sharded_state,
    prepare_optimizer_state,
    save_sharded_state,
)
from megalith.core.placement import set_placement
from tests.harness import run_distributed


def full_model_after_one_step() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).pow(2).sum().backward()
    opt.step()
    return model, opt


def _save_tp_rank(rank, world_size, path):
    full, full_opt = full_model_after_one_step()
    rows = 6 // world_size
    local = nn.Sequential(nn.Linear(4, rows), nn.LayerNorm(6))
    params = dict(local.named_parameters())
    opt = torch.optim.AdamW(local.parameters(), lr=0.1)
    for name, p_full in full.named_parameters():
        p = params[name]
        sharded = name.startswith("0.")  # the Linear is column-parallel: its rows are split over ranks
        with torch.no_grad():
            p.copy_(p_full[rank * rows : (rank + 1) * rows] if sharded else p_full)
        if sharded:
            owner, local_name = local[0], name.split(".")[-1]
            set_placement(owner, local_name, shard=ShardSpec(tuple(p_full.shape), 0, ((0, rows, rank * rows),)))
        state = full_opt.state[p_full]
        opt.state[p] = {
            k: (v[rank * rows : (rank + 1) * rows].clone() if sharded and v.dim() else v.clone())
            for k, v in state.items()
        }
    save_sharded_state({**model_sharded_state(local), **optimizer_sharded_state(local, opt)}, path)


def test_adamw_state_reshards_from_tp2_to_one_process(tmp_path):
    path = str(tmp_path / "ck")
    run_distributed(_save_tp_rank, 2, path)
    reference, ref_opt = full_model_after_one_step()
    torch.manual_seed(123)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    assert prepare_optimizer_state(model, opt, path) == 4 * 3  # exp_avg, exp_avg_sq, step for 4 tensors
    load_sharded_state({**model_sharded_state(model), **optimizer_sharded_state(model, opt)}, path)
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, p_ref), name
        for key, value in ref_opt.state[p_ref].items():
            assert torch.equal(opt.state[p][key], value), (name, key)
    # One more identical step on both: the restored optimizer continues exactly.
    x = torch.randn(3, 4)
    for m, o in ((model, opt), (reference, ref_opt)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for p, p_ref in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, p_ref)
