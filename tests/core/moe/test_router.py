"""The router, the capacity rule and the auxiliary losses against their definitions, computed independently."""

from __future__ import annotations

import math

import pytest
import torch

from megalith.core.moe.router import (
    Router,
    capacity,
    keep_mask,
    sequence_aux_loss,
    switch_aux_loss,
    topk_indices,
    z_loss,
)
from tests.core.moe.common import moe_config


def _router(**overrides) -> Router:
    router = Router(moe_config(**overrides))
    with torch.no_grad():
        router.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
    return router


def test_topk_ties_go_to_the_lower_expert_index():
    scores = torch.tensor([[0.2, 0.5, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1], [0.3, 0.9, 0.3, 0.9]])
    assert topk_indices(scores, 2).tolist() == [[1, 2], [0, 1], [1, 3]]
    # A router that cannot tell the experts apart routes every token to experts 0..k-1 with equal weights.
    router = Router(moe_config(num_experts=6, moe_top_k=3))
    with torch.no_grad():
        router.weight.zero_()
    out = router(torch.randn(5, router.weight.shape[1]))
    assert out.experts_Tk.tolist() == [[0, 1, 2]] * 5
    torch.testing.assert_close(out.weights_Tk, torch.full((5, 3), 1 / 3))


def test_softmax_top_k_then_softmax_and_softmax_then_top_k():
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(0))
    for norm in (True, False):
        router = _router(moe_norm_topk_prob=norm, moe_top_k=3)
        out = router(x)
        logits = x @ router.weight.detach().t()
        chosen = torch.topk(logits, 3, dim=-1)
        assert torch.equal(out.experts_Tk, chosen.indices)
        expected = torch.softmax(chosen.values, -1) if norm else torch.softmax(logits, -1).gather(1, chosen.indices)
        torch.testing.assert_close(out.weights_Tk, expected)
        torch.testing.assert_close(out.probs_TE, torch.softmax(logits, -1))


def test_sigmoid_scores_and_an_expert_bias_that_chooses_but_does_not_weigh():
    router = _router(moe_score_function="sigmoid", moe_expert_bias=True, num_experts=8, moe_top_k=2)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 0, 0, 0, 0, 5.0, 0, 0]))  # expert 5 always wins a slot
    out = router(x)
    scores = torch.sigmoid(x @ router.weight.detach().t())
    assert (out.experts_Tk[:, 0] == 5).all()
    second = torch.topk(scores.index_fill(1, torch.tensor([5]), -1.0), 1).indices[:, 0]
    assert torch.equal(out.experts_Tk[:, 1], second)
    chosen = scores.gather(1, out.experts_Tk)
    torch.testing.assert_close(out.weights_Tk, chosen / chosen.sum(-1, keepdim=True))
    torch.testing.assert_close(out.probs_TE, scores / scores.sum(-1, keepdim=True))
    assert not router.expert_bias.requires_grad


def _keep_by_rule(experts, weights, num_experts, cap, policy):
    """The documented rule, one expert at a time: best weight (or earliest) first, ties by (token, slot)."""
    t, k = experts.shape
    keep = torch.zeros(t, k, dtype=torch.bool)
    for e in range(num_experts):
        slots = [(i, j) for i in range(t) for j in range(k) if experts[i, j] == e]
        if policy == "probs":
            slots.sort(key=lambda ij: (-float(weights[ij]), ij[0], ij[1]))
        for i, j in slots[:cap]:
            keep[i, j] = True
    return keep


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_keep_mask_follows_the_documented_drop_policy(policy):
    gen = torch.Generator().manual_seed(5)
    for trial in range(20):
        t, k, e = 13, 2, 5
        experts = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
        weights = torch.randint(0, 4, (t, k), generator=gen).float() / 4  # many exact ties
        cap = capacity(t, k, e, 0.5 + 0.25 * (trial % 4))
        got = keep_mask(experts, weights, e, cap, policy)
        assert torch.equal(got, _keep_by_rule(experts, weights, e, cap, policy)), trial
    assert capacity(10, 2, 4, 1.0) == 5 and capacity(10, 2, 4, 1.1) == 6 and capacity(3, 1, 8, 1.0) == 1


def test_aux_losses_match_their_definitions_and_split_over_ranks():
    gen = torch.Generator().manual_seed(2)
    b, s, e, k = 3, 8, 6, 2
    logits = torch.randn(b * s, e, generator=gen)
    probs = torch.softmax(logits, -1)
    experts = topk_indices(probs, k)
    counts = torch.bincount(experts.reshape(-1), minlength=e)
    f = counts.double() / (b * s * k)  # fraction of routed slots per expert
    p = probs.double().mean(0)  # mean probability per expert
    whole = switch_aux_loss(probs.double(), counts, b * s, k)
    torch.testing.assert_close(whole, e * (f * p).sum())
    # Split over two "ranks" (sequence halves) with global counts: the parts add up to the whole.
    halves = probs.view(b, s, e).chunk(2, dim=1)
    parts = sum(switch_aux_loss(h.reshape(-1, e).double(), counts, b * s, k) for h in halves)
    torch.testing.assert_close(parts, whole)
    # Per sequence: the switch loss of each sequence, averaged.
    per_seq = []
    counts_be = torch.zeros(b, e, dtype=torch.int64)
    for i in range(b):
        rows = slice(i * s, (i + 1) * s)
        c = torch.bincount(experts[rows].reshape(-1), minlength=e)
        counts_be[i] = c
        per_seq.append(e * ((c.double() / (s * k)) * probs[rows].double().mean(0)).sum())
    torch.testing.assert_close(sequence_aux_loss(probs.view(b, s, e).double(), counts_be, s, k), sum(per_seq) / b)
    lse = torch.stack([torch.tensor(math.log(sum(math.exp(v) for v in row))) for row in logits.tolist()])
    torch.testing.assert_close(z_loss(logits, b * s), (lse**2).mean().float())
