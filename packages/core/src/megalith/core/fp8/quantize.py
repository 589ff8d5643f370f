"""The arithmetic of the native fp8 recipes: formats, amaxes, scales from amaxes, saturating casts, statistics.

A tensor `x` is cast with a scale `s` (a scalar, or one per row) as `q = fp8(clamp(fp32(x * s), -max, max))`
and stands for `q / s`. `s = max / (amax * 2**margin)`, computed in fp32, where `amax` is the largest |x| (over
the tensor or the row) and `max` the format's largest finite value (448 for e4m3, 57344 for e5m2), so the
largest element lands on the top of the format's range. Rounding to fp8 is to nearest, ties to even.

Non-finite values are never made finite: NaN stays NaN, +-inf becomes +-inf in e5m2 and NaN in e4m3 (which
has no infinity), so a blown-up step is still seen as one. An amax that is NaN counts as +inf (so that a max
over ranks is well defined), and a scale whose amax is not finite and positive falls back to a given value
(1, or the previous scale for delayed scaling).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

__all__ = [
    "FORMATS",
    "Fp8Format",
    "amax_of",
    "cast_stats",
    "cast_to_fp8",
    "reduce_amax",
    "scale_from_amax",
]


@dataclasses.dataclass(frozen=True)
class Fp8Format:
    """One fp8 encoding: the torch dtype, its largest finite value and its smallest subnormal.

    `rounds_to_max` is the largest fp32 magnitude that rounding to nearest (ties to even) still takes to the
    largest value: 464 for e4m3 (the tie goes down to 448, whose significand is even) and just below 61440 for
    e5m2 (the tie goes up, past 57344).
    """

    name: str
    dtype: torch.dtype
    max: float
    min_subnormal: float
    rounds_to_max: float
    has_inf: bool


FORMATS = {
    "e4m3": Fp8Format("e4m3", torch.float8_e4m3fn, 448.0, 2.0**-9, 464.0, has_inf=False),
    "e5m2": Fp8Format("e5m2", torch.float8_e5m2, 57344.0, 2.0**-16, 61440.0 - 2.0**-8, has_inf=True),
}


def amax_of(x: torch.Tensor, rowwise: bool = False) -> torch.Tensor:
    """max |x| in fp32: one value (0-d), or one per row of a 2-D tensor ([rows, 1]); NaN counts as +inf."""
    a = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax()
    return torch.nan_to_num(a.float(), nan=math.inf, posinf=math.inf)


def reduce_amax(amax: torch.Tensor, group) -> torch.Tensor:
    """The max of `amax` over `group` (in place; nothing to do without a group of several ranks)."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax


def scale_from_amax(
    amax: torch.Tensor, fmt: Fp8Format, margin: int = 0, fallback: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """fp32 scale `(max * 2**-margin) / amax` (one rounding), or `fallback` where amax is not finite and positive
    or the scale would not be finite (an amax below about 1e-36)."""
    amax = amax.float()
    # A true division (a Python number over a tensor would multiply by a rounded reciprocal). An amax of 0, inf
    # or NaN gives a scale of inf, 0 or NaN: the fallback.
    scale = torch.full_like(amax, fmt.max * 2.0**-margin) / amax
    ok = torch.isfinite(scale) & (scale > 0)
    fallback = torch.as_tensor(fallback, dtype=torch.float32, device=amax.device)
    return torch.where(ok, scale, fallback)


def cast_to_fp8(x: torch.Tensor, scale: torch.Tensor, fmt: Fp8Format) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scaled): the fp8 tensor of `x * scale` (saturated to the format's range) and the fp32 `x * scale`.

    `scale` is 0-d or broadcasts along `x`'s rows ([rows, 1]). Non-finite elements of `x` stay non-finite.
    """
    scaled = x.float() * scale
    clamped = scaled.clamp(-fmt.max, fmt.max)  # NaN stays NaN; only +-inf needs putting back
    inf = torch.isinf(x)
    clamped = torch.where(inf, scaled, clamped) if fmt.has_inf else clamped.masked_fill_(inf, math.nan)
    return clamped.to(fmt.dtype), scaled


def cast_stats(x: torch.Tensor, scaled: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """[saturated, underflowed] element counts (int64) of one cast.

    Saturated: a finite element that the clamp saved from overflowing (its scaled magnitude would round past
    the largest value: above `fmt.rounds_to_max`). Underflowed: a finite non-zero element that became zero (its
    scaled magnitude is at most half the smallest subnormal, which rounds to zero).
    """
    magnitude = scaled.abs()
    finite = torch.isfinite(x)
    saturated = ((magnitude > fmt.rounds_to_max) & finite).sum()
    underflowed = ((magnitude <= fmt.min_subnormal / 2) & (x != 0) & finite).sum()
    return torch.stack([saturated, underflowed])
