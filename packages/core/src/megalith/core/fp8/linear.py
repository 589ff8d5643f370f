"""fp8 linear layers of the native backend: the casts of one layer (`LinearCasts`) and its autograd matmul.

Three matmuls per linear, each on fp8 operands (x: input [M, K], w: weight [N, K], g: output gradient [M, N]):

    forward      y  = x  @ w^T      operands x (e4m3), w (e4m3)
    backward     dx = g  @ w        operands g (e5m2 in 'hybrid', e4m3 in 'e4m3'), w
    backward     dw = g^T @ x       operands g, x

With one scale per tensor (tensorwise, delayed), x and w are cast once in the forward and their fp8 copies kept
for the backward (half the memory of bf16). Rowwise scales run along the contraction dimension of each matmul,
so the backward casts the kept high-precision x and w again along their other axis (as torchao's rowwise
recipe does).

Under tensor parallelism a rank holds part of x, w or g. Whenever the amax of a cast spans a dimension split
over tp (the input dimension K of a row-parallel layer, the output dimension N of a column-parallel one), it
is reduced over the tp group (max) first, so every rank casts with the scale one process would use: a
tensorwise amax spans both dimensions of its operand, a rowwise one only the contraction dimension.
"""

from __future__ import annotations

import torch

from megalith.core.fp8.gemm import fp8_mm
from megalith.core.fp8.quantize import FORMATS, amax_of, cast_stats, cast_to_fp8, reduce_amax, scale_from_amax

__all__ = ["GRAD", "INPUT", "ROLES", "WEIGHT", "LinearCasts", "fp8_grouped_linear", "fp8_linear"]

INPUT, WEIGHT, GRAD = 0, 1, 2
ROLES = ("input", "weight", "grad")


class LinearCasts:
    """How one linear layer casts its operands: the recipe, its tp sharding and its slot in the chunk's state.

    Args:
        name: the layer's canonical name (`layers.3.attn.qkv`), for messages and checkpoints.
        state: the scaling state of the model chunk (`megalith.core.fp8.state.ChunkScaling`).
        index: this layer's row in that state.
        group: the tensor-parallel group (None alone).
        k_sharded: the input dimension is split over tp (row-parallel).
        n_sharded: the output dimension is split over tp (column-parallel).
    """

    def __init__(self, name: str, state, index: int, *, group, k_sharded: bool, n_sharded: bool) -> None:
        self.name, self.state, self.index = name, state, index
        self.group, self.k_sharded, self.n_sharded = group, k_sharded, n_sharded
        config = state.config
        self.recipe, self.margin, self.mode = config.recipe, config.margin, config.matmul
        grad_format = "e5m2" if config.format == "hybrid" else "e4m3"
        self.formats = (FORMATS["e4m3"], FORMATS["e4m3"], FORMATS[grad_format])

    def cast(self, t: torch.Tensor, role: int, split: tuple[bool, bool], *, record: bool):
        """(fp8 tensor, scale) of the 2-D `t` (its contraction dimension last) under this layer's recipe.

        Args:
            role: INPUT, WEIGHT or GRAD (picks the format and the delayed-scaling slot).
            split: whether `t`'s (rows, contraction) dimensions are split over tp on this layer.
            record: add this amax to the pending amax of delayed scaling (training passes only).
        """
        fmt, state = self.formats[role], self.state
        if self.recipe == "rowwise":
            amax = reduce_amax(amax_of(t, rowwise=True), self.group if split[1] else None)
            scale = scale_from_amax(amax, fmt, self.margin)
        elif self.recipe == "delayed" and state.initialized:
            scale = state.scale[self.index, role].clone()  # the state is updated in place after the backward
            if record:
                state.record(self.index, role, amax_of(t))
        else:  # tensorwise, and delayed scaling's first step (no history yet): the current amax
            amax = reduce_amax(amax_of(t), self.group if any(split) else None)
            scale = scale_from_amax(amax, fmt, self.margin)
            if record and self.recipe == "delayed":
                state.record(self.index, role, amax)
        q, scaled = cast_to_fp8(t, scale, fmt)
        if state.collect_stats:
            state.add_stats(role, cast_stats(t, scaled, fmt), t.numel())
        return q, scale

    def mm(self, a_q, a_scale, b_q, b_scale, out_dtype, *, fast_accum: bool = False) -> torch.Tensor:
        return fp8_mm(a_q, a_scale, b_q, b_scale, out_dtype, mode=self.mode, layer=self.name, fast_accum=fast_accum)


class _Fp8Matmul(torch.autograd.Function):
    """y = x @ w^T on fp8 operands (x [M, K], w [N, K]); the backward's two matmuls are fp8 as well."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, casts: LinearCasts, record: bool) -> torch.Tensor:
        ctx.casts, ctx.x_dtype, ctx.w_dtype = casts, x.dtype, weight.dtype
        k, n = casts.k_sharded, casts.n_sharded  # M (tokens) is never split over tp inside a linear
        xq, sx = casts.cast(x, INPUT, (False, k), record=record)
        wq, sw = casts.cast(weight, WEIGHT, (n, k), record=record)
        y = casts.mm(xq, sx, wq, sw, x.dtype, fast_accum=True)
        if casts.recipe == "rowwise":
            ctx.save_for_backward(x, weight)
        else:
            ctx.save_for_backward(xq, sx, wq, sw)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        casts = ctx.casts
        k, n = casts.k_sharded, casts.n_sharded
        g = grad_y.contiguous()
        if casts.recipe == "rowwise":
            x, weight = ctx.saved_tensors
            gq, sg = casts.cast(g, GRAD, (False, n), record=True)  # rows of g, over N
            wq, sw = casts.cast(weight.t(), WEIGHT, (k, n), record=False)  # columns of w, over N
            grad_x = casts.mm(gq, sg, wq, sw, ctx.x_dtype)
            gtq, sgt = casts.cast(g.t(), GRAD, (n, False), record=False)  # columns of g, over M
            xtq, sxt = casts.cast(x.t(), INPUT, (k, False), record=False)  # columns of x, over M
            grad_w = casts.mm(gtq, sgt, xtq, sxt, ctx.w_dtype)
        else:
            xq, sx, wq, sw = ctx.saved_tensors
            gq, sg = casts.cast(g, GRAD, (False, n), record=True)
            grad_x = casts.mm(gq, sg, wq.t(), sw, ctx.x_dtype)
            grad_w = casts.mm(gq.t(), sg, xq.t(), sx, ctx.w_dtype)
        return grad_x, grad_w, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, casts: LinearCasts, *,
               training: bool) -> torch.Tensor:  # fmt: skip
    """`F.linear(x, weight, bias)` with the matmul in fp8; `training` passes record amaxes for delayed scaling."""
    casts.state.follow(x.device)
    record = training and torch.is_grad_enabled()
    x2 = x.reshape(-1, x.shape[-1])
    y = _Fp8Matmul.apply(x2, weight, casts, record).view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


def fp8_grouped_linear(x_NK: torch.Tensor, w_EMK: torch.Tensor, counts_E: torch.Tensor, casts: LinearCasts, *,
                       training: bool) -> torch.Tensor:  # fmt: skip
    """Row group e of `x_NK` (`counts_E[e]` rows, in order) times `w_EMK[e]^T`, each group an fp8 linear: [N, M].

    The MoE experts' projections: every expert is its own fp8 matmul, so a tensorwise scale covers one expert's
    weight, the rows routed to it here or their output gradient, a rowwise one a row of those (and, for the
    weight gradient, a column over the rows). Scales thus span the tokens that meet in one matmul: results match
    one process when the same tokens reach the expert together. An expert with no rows multiplies in the
    parameter dtype (nothing to scale; its weight still gets its zero gradient).
    """
    casts.state.follow(x_NK.device)
    record = training and torch.is_grad_enabled()
    parts = torch.split(x_NK, counts_E.tolist(), dim=0)
    weights = w_EMK.unbind(0)  # one backward node stacks every expert's gradient (indexing would add E copies)
    outs = [
        _Fp8Matmul.apply(part, w, casts, record) if part.shape[0] else part @ w.t()
        for part, w in zip(parts, weights, strict=True)
    ]
    return torch.cat(outs, dim=0)


class Fp8Matmul:
    """Mixed in before a linear layer's own class: its local matmul runs in fp8.

    The parallel layers call `self.matmul(x, weight, bias)` for their local product; a plain `nn.Linear`
    (no tensor parallelism) gets a forward that does. Parameters, names and placements are unchanged.
    """

    fp8_casts: LinearCasts

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return fp8_linear(x, weight, bias, self.fp8_casts, training=self.training)


class Fp8PlainLinear(Fp8Matmul):
    """The forward of a plain `nn.Linear` (a single-process block linear) through `matmul`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight, self.bias)


class Fp8GroupedExperts:
    """Mixed in before `GroupedExperts`: both expert projections run as fp8 grouped linears (`fp8_casts`: fc1's
    casts, fc2's)."""

    fp8_casts: tuple[LinearCasts, LinearCasts]

    def project(self, x_NK: torch.Tensor, w_EMK: torch.Tensor, counts_E: torch.Tensor, which: int) -> torch.Tensor:
        return fp8_grouped_linear(x_NK, w_EMK, counts_E, self.fp8_casts[which], training=self.training)
