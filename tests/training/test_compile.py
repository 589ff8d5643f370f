"""runtime.compile=true through megalith-train's loop on gloo: the loss curve of eager training, at several layouts.

Each rank trains the same run twice, eager and with compiled blocks, and the two loss curves must agree to a
relative 1e-5 over four optimizer steps (float32; compiled kernels reorder float additions, so bitwise equality is
not expected, while a wrong gradient anywhere moves the loss by far more). Both layouts together cover tensor and
sequence parallelism, pipeline stages (interleaved), data parallelism with ZeRO-1, no recompute and selective
recompute (tests/core/test_compile.py checks full recompute), and both op sets; each rank compiles one block graph.
"""

from __future__ import annotations

import pytest
import torch

from megalith.core.pipeline import unwrap
from megalith.training.config_tree import ConfigError
from tests.harness import run_distributed
from tests.training.loop_common import layout, make_config, train_losses

LLAMA = ["model.family=llama", "model.norm=rmsnorm", "model.activation=swiglu", "model.position_embedding=rope",
         "model.num_kv_heads=2", "model.bias=false", "model.tie_embeddings=false"]  # fmt: skip
STEPS = ["training.train_iters=4", "schedule.decay_style=constant"]


def _eager_and_compiled(rank, world_size, tmp, overrides):
    curves = {}
    for compile_ in (False, True):
        torch._dynamo.utils.counters.clear()
        cfg = make_config(f"{tmp}/{compile_}", *STEPS, *overrides, f"runtime.compile={str(compile_).lower()}")
        losses, trainer = train_losses(cfg)
        blocks = [layer for chunk in trainer.chunks for layer in unwrap(chunk).layers.values()]
        compiled = [layer._compiled_call_impl is not None for layer in blocks]
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        curves[compile_] = ([loss for _, loss in losses], compiled, graphs)
    return curves


@pytest.mark.parametrize(
    ("world_size", "overrides"),
    [
        (
            4,
            [
                *layout(2, 1, "parallel.sequence_parallel=true", "ddp.use_distributed_optimizer=true"),
                *LLAMA,
                "runtime.recompute=selective",
                "runtime.kernels=fused",
            ],
        ),
        (2, [*layout(1, 2, "parallel.virtual_stages=2")]),
    ],
    ids=["llama-tp2-sp-dp2-zero1-selective-fused", "gpt-pp2-interleaved"],
)
def test_compiled_blocks_follow_the_eager_loss_curve(tmp_path, world_size, overrides):
    results = run_distributed(_eager_and_compiled, world_size, str(tmp_path), overrides, init=False, timeout=600)
    for curves in results:
        eager, eager_compiled, _ = curves[False]
        losses, compiled, graphs = curves[True]
        assert not any(eager_compiled) and compiled and all(compiled)
        assert graphs >= 1  # dynamo really produced a graph (and did not fall back to eager)
        assert len(losses) == len(eager) == 4
        assert losses == pytest.approx(eager, rel=1e-5)
        assert losses == results[0][True][0]  # every rank agrees


def test_training_compile_names_its_place():
    with pytest.raises(ConfigError, match=r"'training.compile' .* is spelled 'runtime.compile'"):
        make_config("unused", "training.compile=true")
