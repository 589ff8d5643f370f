"""The Transformer Engine backend: runs only where transformer_engine imports and a GPU is present (no machine
of Megalith's CI has it, so these tests have not run there)."""

from __future__ import annotations

import pytest
import torch

from megalith.core import build_loss_fn, build_model_chunks, named_placements
from megalith.core.checkpoint import model_sharded_state
from megalith.core.fp8 import BLOCK_LINEARS, Fp8Config
from tests.core.parallel_checks import llama_config

pytestmark = [pytest.mark.cuda, pytest.mark.te]


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_te_linears_keep_canonical_names_and_train_close_to_bf16(recipe):
    te = pytest.importorskip("transformer_engine.pytorch")
    config = llama_config(hidden_size=128, num_attention_heads=8, ffn_hidden_size=256)  # TE wants multiples of 16
    (plain,) = build_model_chunks(config, seed=3, device="cuda", dtype=torch.bfloat16)
    (model,) = build_model_chunks(config, fp8=Fp8Config(recipe=recipe, backend="te"), seed=3, device="cuda",
                                  dtype=torch.bfloat16)  # fmt: skip
    for i in range(config.num_layers):
        for path in BLOCK_LINEARS:
            assert isinstance(model.get_submodule(f"layers.{i}.{path}"), te.Linear)
    assert {n: w for n, _, w in named_placements(model)} == {n: w for n, _, w in named_placements(plain)}
    assert model_sharded_state(model).keys() == model_sharded_state(plain).keys()
    ids = torch.randint(0, config.vocab_size, (4, 17), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    losses = []
    for m in (plain, model):
        loss = build_loss_fn(m)(m(ids[:, :-1]), ids[:, 1:]).float().mean()
        loss.backward()
        losses.append(float(loss))
    assert abs(losses[1] - losses[0]) < 0.02 * losses[0], losses
