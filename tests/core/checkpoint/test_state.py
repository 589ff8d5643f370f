"""Model and AdamW state saved from a 2-rank tensor-parallel layout, loaded into one unsharded process.

The test process trains the full model one step and hands those very tensors to the ranks, which save their tp
slices. Loading must give back the same bits, because saving and loading only copy bytes. The ranks must not
recompute the step themselves: they run with one thread in other processes, and torch does not promise that
the same float computation rounds identically across processes, thread counts or CPU kernels.
"""

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


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, tuple[torch.Tensor, dict]]:
    """Each parameter of `model` (by name) with its AdamW state, detached copies that can be sent to the ranks."""
    return {
        name: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
        for name, p in model.named_parameters()
    }


def _save_tp_rank(rank, world_size, path, full):
    rows = 6 // world_size
    local = nn.Sequential(nn.Linear(4, rows), nn.LayerNorm(6))
    params = dict(local.named_parameters())
    opt = torch.optim.AdamW(local.parameters(), lr=0.1)
    for name, (p_full, state) in full.items():
        p = params[name]
        sharded = name.startswith("0.")  # the Linear is column-parallel: its rows are split over ranks
        with torch.no_grad():
            p.copy_(p_full[rank * rows : (rank + 1) * rows] if sharded else p_full)
        if sharded:
            owner, local_name = local[0], name.split(".")[-1]
            set_placement(owner, local_name, shard=ShardSpec(tuple(p_full.shape), 0, ((0, rows, rank * rows),)))
        opt.state[p] = {
            k: (v[rank * rows : (rank + 1) * rows].clone() if sharded and v.dim() else v.clone())
            for k, v in state.items()
        }
    save_sharded_state({**model_sharded_state(local), **optimizer_sharded_state(local, opt)}, path)


def test_adamw_state_reshards_from_tp2_to_one_process(tmp_path):
    path = str(tmp_path / "ck")
    reference, ref_opt = full_model_after_one_step()
    run_distributed(_save_tp_rank, 2, path, full_state(reference, ref_opt))
    torch.manual_seed(123)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    assert prepare_optimizer_state(model, opt, path) == 4 * 3  # exp_avg, exp_avg_sq, step for 4 tensors
    load_sharded_state({**model_sharded_state(model), **optimizer_sharded_state(model, opt)}, path)
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, p_ref), name
        for key, value in ref_opt.state[p_ref].items():
            assert torch.equal(opt.state[p][key], value), (name, key)
    # One more identical step on both, in this process: the same ops on the same bits give the same bits, so the
    # restored optimizer continues exactly.
    x = torch.randn(3, 4)
    for m, o in ((model, opt), (reference, ref_opt)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for p, p_ref in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, p_ref)
