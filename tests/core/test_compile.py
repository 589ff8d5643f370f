"""Compiled blocks (`apply_compile`, runtime.compile): same logits and gradients as eager, names kept, dropout refused.

torch.compile on a CPU generates and compiles C++ (a compiler is needed, as in CI); the model is the smallest
Llama of the core tests so that one compile of one block graph costs a few seconds.
"""

from __future__ import annotations

import pytest
import torch

from megalith.core import RuntimeConfig, apply_compile, apply_dropout
from tests.core.parallel_checks import build, llama_config


def _forward_backward(model, ids):
    logits = model(ids)
    weights = torch.linspace(-1.0, 1.0, logits.numel()).view_as(logits)  # a loss that weighs every logit
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_blocks_match_eager_logits_and_gradients():
    recompute = "full"  # the checkpoint inside the compiled graph; tests/training covers "selective" and "none"
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    config = llama_config(num_layers=3)
    eager = build(config, runtime=RuntimeConfig(recompute=recompute))
    compiled = build(config, runtime=RuntimeConfig(recompute=recompute, compile=True))
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    for _ in range(2):  # the second call runs the cached graph
        ref_logits, ref_grads = _forward_backward(eager, ids)
        logits, grads = _forward_backward(compiled, ids)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
    stats = torch._dynamo.utils.counters["stats"]
    assert stats["unique_graphs"] == 1  # one graph for every block: regional, and the RoPE cache adds none


def test_compile_refuses_dropout():
    model = apply_dropout(build(llama_config()), hidden=0.1)
    with pytest.raises(
        ValueError, match=r"dropout off, but embed_dropout, layers\.0\.dropout, layers\.1\.dropout draw"
    ):
        apply_compile(model)
    with pytest.raises(ValueError, match=r"compile=true needs hidden_dropout \(0.1\) and attention_dropout"):
        RuntimeConfig(compile=True, hidden_dropout=0.1)
    with pytest.raises(ValueError, match=r"RuntimeConfig\.compile must be true or false, got 'yes'"):
        RuntimeConfig(compile="yes")
