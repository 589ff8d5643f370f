"""Pipeline schedules: no pipelining, 1F1B and interleaved 1F1B, run by one executor over per-rank action lists.

A schedule is the order in which this rank runs forward (F) and backward (B) passes of (chunk, micro-batch)
pairs. The executor receives a pass's input just before running it, sends its output with the next receive,
frees an output's storage once it is sent (its autograd graph stays), scales each micro-batch's loss by
1 / num_microbatches (and the fp16 loss scale), enables gradient reduction only for each chunk's last
backward, and finally finishes the data-parallel reduction and sums the tied-embedding gradients.

Micro-batches are dicts with `input_ids` [B, S] (read on the first stage) and `labels` [B, S] (read on the
last; -100 marks ignored tokens), and optionally `position_ids` [B, S] and `cu_seqlens` (packed documents), which
every stage's forward receives. A micro-batch's loss is the mean, over its non-ignored tokens, of the per-token
loss `loss_fn(logits, labels)` (`megalith.core.loss`), which lives outside the model. The auxiliary terms the
chunk's layers record in each forward (`take_aux_losses`: MoE load balancing and z-loss) are added to the
objective with the same 1 / num_microbatches and loss scale, on whichever stage holds those layers: the last
stage adds them to its loss, earlier stages backpropagate them together with the received gradient. The loss
returned (and reported) is the language-model loss alone.

Under context parallelism every rank of a cp group is given the same full micro-batches and keeps its own tokens
(`shard_microbatch`). Its loss is its tokens' loss sum over the micro-batch's whole count of non-ignored tokens,
so the cp ranks' losses (and their gradients, which DDP sums over cp) add up to the micro-batch's mean.

With `overlap_p2p` (gloo only, see `megalith.core.pipeline.p2p`) each pass's send is posted as soon as the pass
ends, together with the receives of this rank's next forward and next backward, and each receive is waited for
only right before its pass: the transfers run while the rank computes the passes in between. The results are those
of the plain executor (the same operations on the same data).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

from megalith.core._torch_compat import is_view
from megalith.core.context_parallel import shard_microbatch
from megalith.core.distributed.comm import Comms, TorchGroupComm
from megalith.core.distributed.ddp import DistributedDataParallel
from megalith.core.loss import take_aux_losses
from megalith.core.parallel_dims import ParallelDims
from megalith.core.parallelize import reduce_sequence_parallel_grads
from megalith.core.pipeline.p2p import PipeComm
from megalith.core.pipeline.stages import allreduce_shared_embedding_grads, unwrap

__all__ = [
    "Action",
    "allreduce_sequence_parallel_grads",
    "finalize_grads",
    "forward_backward",
    "microbatch_loss",
    "schedule_order",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> per-token loss


@dataclass(frozen=True)
class Action:
    """One pass: `kind` "F" or "B" of model chunk `chunk` on micro-batch `mb`."""

    kind: str
    chunk: int
    mb: int


def _one_f_one_b(pp: int, pp_rank: int, m: int) -> list[Action]:
    # Stage r first runs pp - r - 1 forwards so the pipeline fills, then alternates, then drains.
    warmup = min(pp - pp_rank - 1, m)
    order = [Action("F", 0, i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [Action("F", 0, warmup + i), Action("B", 0, i)]
    order += [Action("B", 0, i) for i in range(m - warmup, m)]
    return order


def _interleaved(pp: int, pp_rank: int, m: int, vp: int) -> list[Action]:
    # Virtual micro-batch k runs pp micro-batches through one chunk, then the same pp through the next chunk;
    # backward walks the chunks in reverse. Warmup fills the deeper virtual pipeline (Megatron's count).
    total = m * vp

    def action(kind: str, k: int) -> Action:
        chunk = (k // pp) % vp
        return Action(kind, chunk if kind == "F" else vp - 1 - chunk, (k // (pp * vp)) * pp + k % pp)

    warmup = min((pp - pp_rank - 1) * 2 + (vp - 1) * pp, total)
    order = [action("F", k) for k in range(warmup)]
    for i in range(total - warmup):
        order += [action("F", warmup + i), action("B", i)]
    order += [action("B", k) for k in range(total - warmup, total)]
    return order


def schedule_order(pp: int, pp_rank: int, num_microbatches: int, virtual_stages: int = 1) -> list[Action]:
    """This rank's order of passes (1F1B when virtual_stages == 1, which for pp == 1 is plain accumulation)."""
    m, vp = num_microbatches, virtual_stages
    if m < 1:
        raise ValueError(f"the number of micro-batches must be >= 1, got {m}")
    if vp == 1:
        return _one_f_one_b(pp, pp_rank, m)
    if pp == 1:
        raise ValueError(f"interleaving (virtual_stages={vp}) needs pp > 1")
    if m % pp:
        raise ValueError(
            f"the interleaved schedule needs the number of micro-batches ({m}) to be a multiple of pp ({pp})"
        )
    return _interleaved(pp, pp_rank, m, vp)


def microbatch_loss(
    loss_fn: LossFn, logits: torch.Tensor, labels: torch.Tensor, num_tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token loss summed over the tokens whose label is not -100, divided by their count (fp32 scalar).

    `num_tokens` replaces the count when these labels are only part of the micro-batch (a cp rank's tokens).
    """
    per_token = loss_fn(logits, labels).float()
    count = (labels != -100).sum() if num_tokens is None else num_tokens
    return per_token.sum() / count.clamp(min=1)


def _release(t: torch.Tensor) -> None:
    # Frees the activation's memory but keeps its autograd node and its shape: the data becomes one element
    # broadcast to the shape (stride 0), so torch.autograd.backward later accepts the received gradient for it.
    # Autograd keeps its own reference to whatever the node saved, so backward is unaffected. A view is left alone:
    # its memory belongs to its base, and autograd tracks a view through its base.
    if t.grad_fn is not None and not is_view(t):
        t.data = torch.empty((), dtype=t.dtype, device=t.device).expand(t.shape)


def _backward(output: torch.Tensor, grad: torch.Tensor | None, aux: torch.Tensor | None = None) -> None:
    """Backward from `output` (a loss when `grad` is None) and from an auxiliary loss `aux` with its scale folded
    in (gradient 1)."""
    if grad is None:
        torch.autograd.backward(output)
    elif aux is None:
        torch.autograd.backward(output, grad)
    else:
        torch.autograd.backward((output, aux), (grad, torch.ones_like(aux)))


def finalize_grads(chunks: Sequence[nn.Module], dims: ParallelDims) -> None:
    """Makes the gradients final before the optimizer step (the schedule calls it; call it yourself otherwise).

    Completes the dp reduction of every DDP chunk, sums over tp the gradients of parameters marked
    placed `sequence_parallel` (replicated weights that each tp rank saw only part of the sequence for), then
    sums the tied embedding over the first and last stage.
    """
    for chunk in chunks:
        if isinstance(chunk, DistributedDataParallel):
            chunk.finish_grad_sync()
    allreduce_sequence_parallel_grads(chunks, dims)
    allreduce_shared_embedding_grads(chunks, dims)


def allreduce_sequence_parallel_grads(chunks: Sequence[nn.Module], dims: ParallelDims) -> None:
    """Sums the sequence-parallel parameters' gradients over tp in one flat all-reduce."""
    if dims.tp > 1:
        reduce_sequence_parallel_grads([unwrap(chunk) for chunk in chunks], dims.tp_group)


def forward_backward(
    chunks: Sequence[nn.Module],
    microbatches: Sequence[dict],
    dims: ParallelDims,
    *,
    loss_fn: LossFn,
    hidden_shape: Sequence[int],
    dtype: torch.dtype,
    loss_scale: float = 1.0,
    forward_only: bool = False,
    release_outputs: bool = True,
    comms: Comms | None = None,
    overlap_p2p: bool = False,
) -> float:
    """Runs every micro-batch forward and backward through this rank's chunks and returns the mean loss.

    Args:
        chunks: this rank's model chunks in virtual-stage order (DDP-wrapped or plain modules).
        microbatches: the step's micro-batches of full sequences (every pipeline and cp rank passes the same
            list).
        dims: the topology (pp, pp_rank, pp_group, cp, cp_rank, cp_group, and the data-parallel ranks the loss is
            averaged over).
        loss_fn: per-token loss of the last stage's logits (`megalith.core.loss.build_loss_fn`).
        hidden_shape: shape of the activation passed between stages, e.g. (B, S, H): (B, S/cp, H) under context
            parallelism, divided by tp again with sequence parallelism.
        dtype: dtype of that activation (the parameter dtype).
        loss_scale: multiplies each loss before backward (fp16 dynamic loss scale).
        forward_only: run forwards only, without gradients (evaluation).
        release_outputs: free each sent activation's storage right after its send.
        comms: the transport of the pipeline's transfers (`Comms.pp`; default: torch.distributed over pp_group).
        overlap_p2p: post each send as soon as its pass ends, with the receives of the next forward and the next
            backward, and wait for a receive only right before its pass (`ParallelConfig.overlap_p2p_comm`; gloo
            only).

    Returns:
        The loss averaged over micro-batches and dp ranks, on every rank of the pipeline.
    """
    if overlap_p2p and dims.pp > 1:
        if dist.get_backend(dims.pp_group) != "gloo":
            raise ValueError(
                f"overlap_p2p_comm is implemented for the gloo backend only, not {dist.get_backend(dims.pp_group)!r}: "
                "NCCL matches point-to-point operations in posting order; set parallel.overlap_p2p_comm=false"
            )
        if comms is not None and not isinstance(comms.pp, TorchGroupComm):
            raise ValueError(
                "overlap_p2p_comm is implemented for parallel.comm=torch over gloo only, not for "
                f"{type(comms.pp).__name__}; set parallel.overlap_p2p_comm=false"
            )
    run = _Executor(
        chunks, microbatches, dims, loss_fn, hidden_shape, dtype, loss_scale, forward_only, release_outputs, comms
    )
    order = schedule_order(dims.pp, dims.pp_rank, len(microbatches), len(chunks))
    if forward_only:
        order = [a for a in order if a.kind == "F"]
    last_backward = {a.chunk: i for i, a in enumerate(order) if a.kind == "B"}
    ahead = _lookahead(order) if overlap_p2p and dims.pp > 1 else None
    for index, action in enumerate(order):
        if action.kind == "F":
            run.forward(action.chunk, action.mb)
        else:
            run.backward(action.chunk, action.mb, sync_grads=index == last_backward[action.chunk])
        if ahead is not None:
            run.post_ahead(ahead[index])
    run.comm.finish()
    if not forward_only:
        with record_function("megalith.grad_sync"):
            finalize_grads(chunks, dims)
    return _reduce_loss(run.losses, dims, run.device)


def _lookahead(order: list[Action]) -> list[list[Action]]:
    """For each position of `order`, the next forward and the next backward after it (those that exist)."""
    out: list[list[Action]] = []
    following: dict[str, Action] = {}
    for action in reversed(order):
        out.append(list(following.values()))
        following[action.kind] = action
    return out[::-1]


class _Executor:
    """Runs single passes for `forward_backward`, keeping each micro-batch's stage input and output until its
    backward. Virtual stage `chunk * pp + pp_rank` receives from the stage before it and sends to the next."""

    def __init__(
        self, chunks, microbatches, dims, loss_fn, hidden_shape, dtype, loss_scale, forward_only, release, comms=None
    ):
        self.chunks, self.dims, self.loss_fn = chunks, dims, loss_fn
        self.microbatches = [shard_microbatch(batch, dims.cp, dims.cp_rank) for batch in microbatches]
        self.hidden_shape, self.dtype = tuple(hidden_shape), dtype
        self.loss_scale, self.forward_only, self.release = loss_scale, forward_only, release
        self.num_stages = dims.pp * len(chunks)
        self.device = next(unwrap(chunks[0]).parameters()).device
        self.comm = PipeComm(dims, comms.pp if comms is not None else None)
        self.saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]] = {}
        self.losses: list[torch.Tensor] = []
        # Receives posted ahead of their pass (overlap_p2p): (stage, mb, backward) -> (buffer, handle).
        self.posted: dict[tuple[int, int, bool], tuple[torch.Tensor, object]] = {}

    def _stage(self, chunk: int) -> tuple[int, bool, bool]:
        stage = chunk * self.dims.pp + self.dims.pp_rank
        return stage, stage == 0, stage == self.num_stages - 1

    def _tag(self, stage: int, mb: int, backward: bool) -> int:
        # Names the receiving virtual stage, the micro-batch and the direction.
        return (mb * self.num_stages + stage) * 2 + int(backward)

    def _receive(self, stage: int, mb: int, backward: bool) -> torch.Tensor:
        posted = self.posted.pop((stage, mb, backward), None)
        if posted is not None:
            buffer, handle = posted
            handle.wait()
            return buffer
        buffer = torch.empty(self.hidden_shape, dtype=self.dtype, device=self.device)
        self.comm.flush((buffer, backward, self._tag(stage, mb, backward)))
        return buffer

    def post_ahead(self, actions: Sequence[Action]) -> None:
        """Posts the queued sends now, with the receives `actions` will need (those not posted yet)."""
        recvs, keys = [], []
        for action in actions:
            stage, first, last = self._stage(action.chunk)
            backward = action.kind == "B"
            key = (stage, action.mb, backward)
            if (last if backward else first) or key in self.posted:
                continue
            buffer = torch.empty(self.hidden_shape, dtype=self.dtype, device=self.device)
            recvs.append((buffer, backward, self._tag(stage, action.mb, backward)))
            keys.append(key)
        for key, (buffer, _, _), handle in zip(keys, recvs, self.comm.post(recvs), strict=True):
            self.posted[key] = (buffer, handle)

    def forward(self, chunk: int, mb: int) -> None:
        stage, first, last = self._stage(chunk)
        x = None
        if first:
            self.comm.flush()
        else:
            x = self._receive(stage, mb, backward=False).requires_grad_(not self.forward_only)
        batch = self.microbatches[mb]
        inputs = {key: batch[key] for key in ("position_ids", "cu_seqlens") if key in batch}
        with torch.set_grad_enabled(not self.forward_only), record_function("megalith.forward"):
            model = unwrap(self.chunks[chunk])
            y = model(batch["input_ids"] if first else x, **inputs)
            aux = take_aux_losses(model)  # this chunk's layers' share of the objective
            if aux is not None:
                aux = aux * (self.loss_scale / len(self.microbatches))
            if last:
                count = batch.get("num_loss_tokens")
                loss = microbatch_loss(self.loss_fn, y, batch["labels"], count) / len(self.microbatches)
                self.losses.append(loss.detach())
                y = loss * self.loss_scale if self.loss_scale != 1.0 else loss
                if aux is not None:
                    y, aux = y + aux, None
        if not last:
            on_sent = functools.partial(_release, y) if self.release and not self.forward_only else None
            self.comm.send(y.detach(), True, self._tag(stage + 1, mb, False), on_sent=on_sent)
        if not self.forward_only:
            self.saved[(chunk, mb)] = (x, y, aux)

    def backward(self, chunk: int, mb: int, sync_grads: bool) -> None:
        stage, first, last = self._stage(chunk)
        grad = None
        if last:
            self.comm.flush()
        else:
            grad = self._receive(stage, mb, backward=True)
        if isinstance(self.chunks[chunk], DistributedDataParallel):
            self.chunks[chunk].set_grad_sync(sync_grads)  # reduce only during the chunk's last backward
        x, y, aux = self.saved.pop((chunk, mb))
        with record_function("megalith.backward"):
            _backward(y, grad, aux)
        del y, aux
        if not first:
            self.comm.send(x.grad, False, self._tag(stage - 1, mb, True))


def _reduce_loss(losses: list[torch.Tensor], dims: ParallelDims, device: torch.device) -> float:
    # Only the last stage has losses; summing over pp hands its value to every stage, summing over cp adds the
    # ranks' parts of each micro-batch, the sum over the data ranks (ep x dp) averages.
    total = (
        torch.stack(losses).sum().double().reshape(1) if losses else torch.zeros(1, dtype=torch.float64, device=device)
    )
    if dims.pp > 1:
        dist.all_reduce(total, group=dims.pp_group)
    if dims.cp > 1:
        dist.all_reduce(total, group=dims.cp_group)
    if dims.data_parallel_size > 1:
        dist.all_reduce(total, group=dims.data_group)
        total /= dims.data_parallel_size
    return float(total.item())
