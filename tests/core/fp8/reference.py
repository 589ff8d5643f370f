"""float64 reference of the native fp8 recipes, written from the formats' definitions and the recipe's
arithmetic (as the core README states it), not from megalith's code: used to check it.

Formats: e4m3 (3 mantissa bits, smallest normal exponent -6, largest value 448, no infinity) and e5m2
(2 mantissa bits, exponent -14, 57344, with infinity). Rounding is to nearest, ties to even.
"""

from __future__ import annotations

import math

import numpy as np
import torch

FORMATS = {
    "e4m3": {"mantissa": 3, "emin": -6, "max": 448.0, "inf": False},
    "e5m2": {"mantissa": 2, "emin": -14, "max": 57344.0, "inf": True},
}


def to_f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def round_to_grid(v: np.ndarray, fmt: str) -> np.ndarray:
    """Finite `v` rounded to the nearest value of the format's grid (ties to even), without any range limit."""
    spec = FORMATS[fmt]
    a = np.abs(v)
    with np.errstate(divide="ignore"):
        exponent = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    exponent = np.maximum(exponent, spec["emin"])
    quantum = np.exp2(exponent - spec["mantissa"])
    return np.sign(v) * np.round(a / quantum) * quantum  # np.round: half to even; a / quantum is exact


def amax(x: np.ndarray, axis=None) -> np.ndarray:
    """max |x| (NaN counts as +inf), over everything or along `axis` (kept)."""
    a = np.abs(x)
    a = np.where(np.isnan(a), np.inf, a)
    return a.max() if axis is None else a.max(axis=axis, keepdims=True)


def scale(amax_value, fmt: str, margin: int = 0, fallback=1.0) -> np.ndarray:
    """fp32(max * 2**-margin / amax) where amax is finite and positive and the result finite, else `fallback`."""
    amax_value = np.asarray(amax_value, dtype=np.float64)
    ok = np.isfinite(amax_value) & (amax_value > 0)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        # float64 division then rounding to fp32 is fp32's correctly rounded division (53 >= 2 * 24 + 2 bits)
        s = (FORMATS[fmt]["max"] * 2.0**-margin / np.where(ok, amax_value, 1.0)).astype(np.float32)
    s = s.astype(np.float64)
    ok &= np.isfinite(s)
    return np.where(ok, s, np.asarray(fallback, dtype=np.float64))


def cast(x: np.ndarray, s, fmt: str) -> tuple[np.ndarray, int, int]:
    """(fp8 values as float64, saturated count, underflowed count) of the recipe's cast of `x` with scale `s`.

    The scaled value is fp32(x * s); finite values are clamped to the range and rounded; NaN stays NaN and
    +-inf stays +-inf in a format with infinity, NaN otherwise. Saturated: finite elements whose rounding
    without the clamp would exceed the largest value. Underflowed: finite non-zero elements that round to 0.
    """
    spec = FORMATS[fmt]
    finite = np.isfinite(x)
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = (x * s).astype(np.float32).astype(np.float64)
    safe = np.where(finite, scaled, 0.0)
    unbounded = round_to_grid(np.where(np.isfinite(safe), safe, spec["max"] * 4), fmt)
    q = round_to_grid(np.clip(safe, -spec["max"], spec["max"]), fmt)
    nonfinite = x if spec["inf"] else np.full_like(x, math.nan)
    q = np.where(finite, q, np.where(np.isnan(x), math.nan, nonfinite))
    saturated = int((finite & (np.abs(unbounded) > spec["max"])).sum())
    underflowed = int((finite & (x != 0) & (q == 0)).sum())
    return q, saturated, underflowed


class DelayedReference:
    """One tensor's delayed scaling: a history of `length` amaxes (newest first) and the scale it gives."""

    def __init__(self, length: int, algo: str, fmt: str, margin: int) -> None:
        self.history = [0.0] * length
        self.scale = 1.0
        self.algo, self.fmt, self.margin = algo, fmt, margin

    def step(self, step_amax: float) -> None:
        self.history = [step_amax, *self.history[:-1]]
        chosen = max(self.history) if self.algo == "max" else self.history[0]
        self.scale = float(scale(chosen, self.fmt, self.margin, fallback=self.scale))


def special_tensor(shape, generator: torch.Generator, *, nonfinite: bool = True) -> torch.Tensor:
    """Fresh random values over many magnitudes, with zeros, tiny values, a few huge ones and inf/NaN."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    x = x * torch.exp2(torch.randint(-12, 8, shape, generator=generator).double())
    flat = x.view(-1)
    n = flat.numel()
    picks = torch.randperm(n, generator=generator)
    flat[picks[: n // 20]] = 0.0
    flat[picks[n // 20 : n // 10]] *= 1e-9  # far below any scale's reach: underflow
    flat[picks[n // 10 : n // 10 + 3]] = torch.tensor([3e4, -5e4, 7e4], dtype=torch.float64)
    if nonfinite:
        flat[picks[n // 10 + 3 : n // 10 + 6]] = torch.tensor([math.inf, -math.inf, math.nan], dtype=torch.float64)
    return x.float()


def deq(t64: np.ndarray, fmt: str, axis=None) -> np.ndarray:
    """The recipe's fp8 cast of `t64` (one scale, or one per slice along `axis`), dequantised, in float64."""
    s = scale(amax(t64, axis=axis), fmt)
    return cast(t64, s, fmt)[0] / s


def linear_operands(x, w, g, recipe: str, grad_fmt: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The dequantised fp8 operand pairs (float64) of the three matmuls: y = a @ b for each of y, dx, dw."""
    x64, w64, g64 = to_f64(x), to_f64(w), to_f64(g)
    if recipe == "rowwise":  # each matmul scales along its contraction dimension
        return {
            "y": (deq(x64, "e4m3", -1), deq(w64, "e4m3", -1).T),
            "dx": (deq(g64, grad_fmt, -1), deq(w64, "e4m3", 0)),
            "dw": (deq(g64, grad_fmt, 0).T, deq(x64, "e4m3", 0)),
        }
    xd, wd, gd = deq(x64, "e4m3"), deq(w64, "e4m3"), deq(g64, grad_fmt)
    return {"y": (xd, wd.T), "dx": (gd, wd), "dw": (gd.T, xd)}


def check_linear(outputs: dict[str, torch.Tensor], x, w, g, recipe: str, grad_fmt: str, dtype: torch.dtype) -> None:
    """Each of y, dx, dw (2-D) against the exact product of its dequantised operands, by the style guide's rule:
    an error at most twice that of plain PyTorch computing the same product in the same dtype (or a few fp32
    roundings of the largest value, when that is larger)."""
    for what, (a, b) in linear_operands(x, w, g, recipe, grad_fmt).items():
        actual = outputs[what]
        exact = a @ b
        plain = (torch.from_numpy(a).to(dtype) @ torch.from_numpy(b).to(dtype)).double().numpy()
        plain_error = float(np.abs(plain - exact).max())
        error = float(np.abs(to_f64(actual) - exact).max())
        floor = 4 * np.finfo(np.float32).eps * float(np.abs(exact).max())
        assert error <= max(2 * plain_error, floor), f"{what}: error {error:.3g}, plain torch {plain_error:.3g}"
