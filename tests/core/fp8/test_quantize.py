"""The native recipes' arithmetic against a float64 reference: scales, casts, statistics, amax histories."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megalith.core.fp8 import ChunkScaling, Fp8Config, Fp8Training
from megalith.core.fp8.linear import GRAD, INPUT, WEIGHT, LinearCasts
from megalith.core.fp8.quantize import FORMATS, amax_of, cast_stats, cast_to_fp8, scale_from_amax
from tests.core.fp8 import reference as ref


def _same(actual: torch.Tensor, expected: np.ndarray) -> None:
    """Bit-for-bit equal values, NaNs in the same places."""
    got = ref.to_f64(actual)
    assert got.shape == expected.shape
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    mask = ~np.isnan(expected)
    mismatch = np.flatnonzero(got[mask] != expected[mask])
    assert mismatch.size == 0, (
        f"{mismatch.size} values differ, e.g. {got[mask][mismatch[:5]]} vs {expected[mask][mismatch[:5]]}"
    )


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("margin", [0, 2])
@pytest.mark.parametrize("nonfinite", [False, True])
def test_tensorwise_cast_matches_the_float64_reference(fmt, margin, nonfinite):
    g = torch.Generator().manual_seed(11 + margin + 3 * nonfinite)
    for trial in range(4):
        x = ref.special_tensor((64, 96), g, nonfinite=nonfinite)
        if trial == 3:
            x = x * 1e-30  # amax so small the scale would overflow: the fallback
        x64 = ref.to_f64(x)
        s_ref = ref.scale(ref.amax(x64), fmt, margin)
        s = scale_from_amax(amax_of(x), FORMATS[fmt], margin)
        assert s.dtype == torch.float32 and s.dim() == 0
        assert float(s) == float(s_ref)
        q, scaled = cast_to_fp8(x, s, FORMATS[fmt])
        assert q.dtype == FORMATS[fmt].dtype
        q_ref, saturated, underflowed = ref.cast(x64, s_ref, fmt)
        _same(q, q_ref)
        assert cast_stats(x, scaled, FORMATS[fmt]).tolist() == [saturated, underflowed]
        if nonfinite:
            assert float(s) == 1.0, "an inf/NaN amax falls back to scale 1"
            assert saturated > 0 or trial == 3, "with scale 1 the huge finite values saturate"
        else:
            assert saturated == 0 and underflowed > 0


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_rowwise_cast_matches_the_float64_reference(fmt):
    g = torch.Generator().manual_seed(5)
    x = ref.special_tensor((48, 80), g)
    x[7] = 0.0  # an all-zero row: its scale falls back to 1
    x64 = ref.to_f64(x)
    s_ref = ref.scale(ref.amax(x64, axis=-1), fmt, 1)
    s = scale_from_amax(amax_of(x, rowwise=True), FORMATS[fmt], 1)
    assert s.shape == (48, 1)
    _same(s, s_ref)
    assert float(s[7]) == 1.0
    q, scaled = cast_to_fp8(x, s, FORMATS[fmt])
    q_ref, saturated, underflowed = ref.cast(x64, s_ref, fmt)
    _same(q, q_ref)
    assert cast_stats(x, scaled, FORMATS[fmt]).tolist() == [saturated, underflowed]


def test_the_overflow_edge_and_bf16_inputs():
    # Around where rounding would leave the range: e4m3's tie at 464 goes down to 448, e5m2's at 61440 up.
    up = 1 + 2**-20
    cases = {"e4m3": ([464.0, 464.0 * up, -465.0, 448.0, 1.0], 2), "e5m2": ([61440.0 / up, 61440.0, -61440.0, 1.0], 2)}
    for fmt, (values, expected) in cases.items():
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.tensor(values, dtype=dtype)
            q, scaled = cast_to_fp8(x, torch.tensor(1.0), FORMATS[fmt])
            q_ref, saturated, underflowed = ref.cast(ref.to_f64(x), 1.0, fmt)
            _same(q, q_ref)
            assert cast_stats(x, scaled, FORMATS[fmt]).tolist() == [saturated, underflowed]
            if dtype == torch.float32:
                assert saturated == expected


def _chunk(config: Fp8Config, layers: int = 2) -> tuple[ChunkScaling, list[LinearCasts]]:
    state = ChunkScaling(config, [f"layers.{i}.mlp.fc1" for i in range(layers)])
    casts = [LinearCasts(name, state, i, group=None, k_sharded=False, n_sharded=False)
             for i, name in enumerate(state.names)]  # fmt: skip
    return state, casts


@pytest.mark.parametrize(("fmt_name", "algo", "length", "margin"),
                         [("hybrid", "max", 4, 0), ("e4m3", "most_recent", 3, 1), ("hybrid", "max", 1, 3)])  # fmt: skip
def test_delayed_scaling_history_and_scales_follow_the_reference(fmt_name, algo, length, margin):
    config = Fp8Config(recipe="delayed", format=fmt_name, amax_history_len=length, amax_compute_algo=algo,
                       margin=margin)  # fmt: skip
    state, casts = _chunk(config)
    manager = Fp8Training([], None, config)
    manager.states = [state]
    formats = {INPUT: "e4m3", WEIGHT: "e4m3", GRAD: "e5m2" if fmt_name == "hybrid" else "e4m3"}
    refs = {(i, r): ref.DelayedReference(length, algo, formats[r], margin) for i in range(2) for r in formats}
    g = torch.Generator().manual_seed(3)
    for step in range(9):
        for (i, role), expected in refs.items():
            step_amax = -math.inf
            for micro in range(2):  # two micro-batches: the step's amax is the larger
                x = torch.randn(16, 32, generator=g) * 2.0 ** float(torch.randint(-10, 10, (1,), generator=g))
                if step == 4 and (i, role, micro) == (0, GRAD, 1):
                    x[3, 3] = math.nan  # a blown-up step: the scale must not change for the whole history
                if step == 5 and (i, role) == (1, WEIGHT):
                    x.zero_()
                x64 = ref.to_f64(x)
                live = step == 0  # no history yet: the current amax
                s_ref = ref.scale(ref.amax(x64), formats[role], margin) if live else expected.scale
                q, s = casts[i].cast(x, role, (False, False), record=True)
                assert float(s) == float(s_ref), (step, i, role)
                _same(q, ref.cast(x64, s_ref, formats[role])[0])
                step_amax = max(step_amax, float(ref.amax(x64)))
            expected.step(step_amax)
        manager.step()
        for (i, role), expected in refs.items():
            assert state.history[i, role].tolist() == pytest.approx(expected.history, rel=0, abs=0), (step, i, role)
            assert float(state.scale[i, role]) == expected.scale, (step, i, role)
    assert state.initialized and float(state.pending.abs().sum()) == 0.0


def test_evaluation_casts_do_not_touch_the_history():
    config = Fp8Config(recipe="delayed")
    state, casts = _chunk(config, layers=1)
    x = torch.randn(8, 16)
    casts[0].cast(x, INPUT, (False, False), record=False)
    assert float(state.pending.abs().sum()) == 0.0
    casts[0].cast(x, INPUT, (False, False), record=True)
    assert float(state.pending[0, INPUT]) == float(x.abs().max())
