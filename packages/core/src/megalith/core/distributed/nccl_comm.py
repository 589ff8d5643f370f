"""Megalith's direct NCCL communicator for torch tensors, created over an existing torch process group.

`NcclCommunicator.from_group(group)` makes an NCCL unique id on the group's rank 0, hands it to every rank
over `group` itself (gloo or NCCL), and joins a `megalith.kernels.nccl.Communicator` on the current CUDA
device. Its operations take tensors and run on the current CUDA stream with no `Work` object: ordering
against other work on that stream is the stream's, and the communicator's watchdog aborts it (so the next
call raises) when an operation has not completed within `timeout` seconds. Ranks (`root`, `peer`) are ranks
within `group`, not global ranks.

    comm = NcclCommunicator.from_group(dims.dp_group, timeout=300)
    comm.all_reduce(grad_bucket, op="avg")
    with comm.group():                       # batched p2p, one launch
        comm.send(activations, peer=next_rank)
        comm.recv(grad_input, peer=prev_rank)
    captured = comm.capture_all_reduce(static_buffer)   # CUDA graph; captured.replay()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megalith.kernels import nccl

__all__ = ["CapturedAllReduce", "NcclCommunicator", "exchange_unique_id"]

# torch dtypes NCCL has (as of the minimum NCCL, 2.18); bool, complex and fp8 are refused.
_NCCL_DTYPES: dict[torch.dtype, str] = {
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.float16: "float16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.bfloat16: "bfloat16",
}
for _name in ("uint32", "uint64"):  # torch >= 2.3
    if hasattr(torch, _name):
        _NCCL_DTYPES[getattr(torch, _name)] = _name

_TORCH_OPS = {
    dist.ReduceOp.SUM: "sum",
    dist.ReduceOp.AVG: "avg",
    dist.ReduceOp.MAX: "max",
    dist.ReduceOp.MIN: "min",
    dist.ReduceOp.PRODUCT: "prod",
}


def exchange_unique_id(group: dist.ProcessGroup | None = None, device: torch.device | None = None) -> bytes:
    """Makes an NCCL unique id on `group`'s rank 0 and returns it on every rank of `group`.

    The 128 bytes travel as a uint8 tensor broadcast over `group`: a CPU tensor when the group's backend
    includes gloo, else a CUDA tensor on `device` (default: the current CUDA device).

    Raises:
        ValueError: this process is not a member of `group`.
    """
    group = dist.group.WORLD if group is None else group
    if dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of group, so it cannot take part in the unique-id exchange")
    if "gloo" in str(dist.get_backend(group)):
        where = torch.device("cpu")
    else:
        where = device if device is not None else torch.device("cuda", torch.cuda.current_device())
    buffer = torch.zeros(nccl.UNIQUE_ID_BYTES, dtype=torch.uint8, device=where)
    if dist.get_rank(group) == 0:
        buffer.copy_(torch.frombuffer(bytearray(nccl.unique_id()), dtype=torch.uint8))
    dist.broadcast(buffer, src=dist.get_global_rank(group, 0), group=group)
    return buffer.cpu().numpy().tobytes()


def _check_tensor(t: torch.Tensor, name: str) -> str:
    """Checks what can be checked without a device (type, dtype, layout); returns the NCCL dtype name."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _NCCL_DTYPES:
        supported = ", ".join(str(d).removeprefix("torch.") for d in _NCCL_DTYPES)
        raise ValueError(f"{name} has dtype {t.dtype}, which NCCL does not support (supported: {supported})")
    if t.layout != torch.strided or not t.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous dense tensor, got shape {tuple(t.shape)} with strides {tuple(t.stride())}"
            " (pass .contiguous() and copy the result back)"
        )
    return _NCCL_DTYPES[t.dtype]


def _check_same_dtype(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.dtype != b.dtype:
        raise ValueError(f"{a_name} ({a.dtype}) and {b_name} ({b.dtype}) must have the same dtype")


def _op_name(op: str | dist.ReduceOp) -> str:
    if isinstance(op, str) and op.lower() in nccl.OPS:
        return op.lower()
    try:
        if op in _TORCH_OPS:
            return _TORCH_OPS[op]
    except TypeError:  # unhashable
        pass
    raise ValueError(f"op must be one of {', '.join(nccl.OPS)} (or the torch.distributed.ReduceOp), got {op!r}")


class CapturedAllReduce:
    """An all-reduce captured in a CUDA graph: `replay()` reduces, in place, whatever the tensor holds now."""

    def __init__(self, comm: NcclCommunicator, graph: torch.cuda.CUDAGraph, tensor: torch.Tensor):
        self.comm, self.graph, self.tensor = comm, graph, tensor

    def replay(self) -> None:
        """Replays the graph on the current stream and lets the communicator's watchdog follow it."""
        self.graph.replay()
        self.comm.watch()


class NcclCommunicator:
    """Collectives and point-to-point transfers of torch CUDA tensors through Megalith's NCCL communicator.

    Build it with `from_group`; the constructor wraps a `megalith.kernels.nccl.Communicator` that already
    exists (its ranks, size and device are the communicator's).

    Args:
        comm: the communicator to use (this object takes it over: `close()` closes it).
        device: the CUDA device of `comm`; every tensor must be on it.
    """

    def __init__(self, comm: nccl.Communicator, device: torch.device):
        device = torch.device(device)
        if device.type != "cuda" or device.index is None:
            raise ValueError(f"device must be a CUDA device with an index (e.g. cuda:0), got {device}")
        self._comm = comm
        self._device = device

    @classmethod
    def from_group(
        cls,
        group: dist.ProcessGroup | None = None,
        *,
        device: torch.device | int | None = None,
        timeout: float = nccl.DEFAULT_TIMEOUT,
    ) -> NcclCommunicator:
        """Creates the communicator of `group` (collective: every rank of `group` must call it).

        Args:
            group: an initialised torch process group (default: the world).
            device: this rank's CUDA device (default: the current one).
            timeout: seconds after which an unfinished operation aborts the communicator (also bounds creation).
        """
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call init_process_group first")
        if not torch.cuda.is_available():
            raise RuntimeError("NcclCommunicator needs a CUDA device, and torch sees none")
        group = dist.group.WORLD if group is None else group
        if device is None:
            index = torch.cuda.current_device()
        else:
            requested = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
            if requested.type != "cuda":
                raise ValueError(f"device must be a CUDA device, got {requested}")
            index = torch.cuda.current_device() if requested.index is None else requested.index
        unique_id = exchange_unique_id(group, torch.device("cuda", index))
        comm = nccl.Communicator(unique_id, dist.get_rank(group), dist.get_world_size(group), index, timeout=timeout)
        return cls(comm, torch.device("cuda", index))

    @property
    def rank(self) -> int:
        """This process's rank in the communicator (its rank in the group it was made from)."""
        return self._comm.rank

    @property
    def size(self) -> int:
        """Number of ranks."""
        return self._comm.size

    @property
    def device(self) -> torch.device:
        """The CUDA device every tensor must be on."""
        return self._device

    @property
    def comm(self) -> nccl.Communicator:
        """The underlying pointer-level communicator."""
        return self._comm

    def _check_device(self, t: torch.Tensor, name: str) -> None:
        if t.device != self._device:
            raise ValueError(f"{name} must be a CUDA tensor on {self._device}, got a tensor on {t.device}")

    def _check_rank(self, value: int, name: str) -> None:
        if not isinstance(value, int) or not 0 <= value < self.size:
            raise ValueError(f"{name} must be a rank in [0, {self.size}) of this communicator, got {value!r}")

    def _stream(self) -> int:
        return torch.cuda.current_stream(self._device).cuda_stream

    def all_reduce(self, tensor: torch.Tensor, op: str | dist.ReduceOp = "sum") -> None:
        """Reduces `tensor` in place over all ranks (op: sum, avg, max, min or prod)."""
        dtype = _check_tensor(tensor, "tensor")
        name = _op_name(op)
        self._check_device(tensor, "tensor")
        ptr = tensor.data_ptr()
        self._comm.all_reduce(ptr, ptr, tensor.numel(), dtype, name, self._stream())

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op: str | dist.ReduceOp = "sum") -> None:
        """out = this rank's block of op over ranks of inp; inp has `size` times the elements of out."""
        dtype = _check_tensor(out, "out")
        _check_tensor(inp, "inp")
        _check_same_dtype(out, "out", inp, "inp")
        if inp.numel() != out.numel() * self.size:
            raise ValueError(
                f"inp must have size ({self.size}) times the elements of out ({out.numel()}), got {inp.numel()}"
            )
        name = _op_name(op)
        self._check_device(out, "out")
        self._check_device(inp, "inp")
        self._comm.reduce_scatter(inp.data_ptr(), out.data_ptr(), out.numel(), dtype, name, self._stream())

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        """out = every rank's inp, concatenated in rank order; out has `size` times the elements of inp."""
        dtype = _check_tensor(out, "out")
        _check_tensor(inp, "inp")
        _check_same_dtype(out, "out", inp, "inp")
        if out.numel() != inp.numel() * self.size:
            raise ValueError(
                f"out must have size ({self.size}) times the elements of inp ({inp.numel()}), got {out.numel()}"
            )
        self._check_device(out, "out")
        self._check_device(inp, "inp")
        self._comm.all_gather(inp.data_ptr(), out.data_ptr(), inp.numel(), dtype, self._stream())

    def broadcast(self, tensor: torch.Tensor, root: int) -> None:
        """Copies root's `tensor` into `tensor` on every rank."""
        dtype = _check_tensor(tensor, "tensor")
        self._check_rank(root, "root")
        self._check_device(tensor, "tensor")
        ptr = tensor.data_ptr()
        self._comm.broadcast(ptr, ptr, tensor.numel(), dtype, root, self._stream())

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        """Sends `tensor` to `peer`, which must post a matching `recv` (use `group()` to pair them)."""
        dtype = _check_tensor(tensor, "tensor")
        self._check_rank(peer, "peer")
        self._check_device(tensor, "tensor")
        self._comm.send(tensor.data_ptr(), tensor.numel(), dtype, peer, self._stream())

    def recv(self, tensor: torch.Tensor, peer: int) -> None:
        """Receives into `tensor` from `peer`."""
        dtype = _check_tensor(tensor, "tensor")
        self._check_rank(peer, "peer")
        self._check_device(tensor, "tensor")
        self._comm.recv(tensor.data_ptr(), tensor.numel(), dtype, peer, self._stream())

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """``with comm.group():`` queues the operations inside and launches them together at the end."""
        with nccl.group():
            yield

    def capture_all_reduce(self, tensor: torch.Tensor, op: str | dist.ReduceOp = "sum") -> CapturedAllReduce:
        """Captures an in-place all-reduce of `tensor` into a CUDA graph (collective: every rank must call it).

        NCCL connects ranks on first use, which cannot happen during a capture, so one all-reduce of a scratch
        tensor of the same size runs eagerly first.
        """
        _check_tensor(tensor, "tensor")
        _op_name(op)
        self._check_device(tensor, "tensor")
        scratch = torch.zeros_like(tensor)
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            self.all_reduce(scratch, op)
        torch.cuda.current_stream(self._device).wait_stream(side)
        self.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self._device), torch.cuda.graph(graph):
            self.all_reduce(tensor, op)
        return CapturedAllReduce(self, graph, tensor)

    def register(self, tensor: torch.Tensor) -> int:
        """Registers `tensor`'s memory with NCCL (NCCL >= 2.19); returns the handle for `deregister`."""
        _check_tensor(tensor, "tensor")
        self._check_device(tensor, "tensor")
        if tensor.numel() == 0:
            raise ValueError("tensor is empty; there is no memory to register")
        return self._comm.register(tensor.data_ptr(), tensor.numel() * tensor.element_size())

    def deregister(self, handle: int) -> None:
        """Undoes `register`; call it before the tensor's memory is freed."""
        self._comm.deregister(handle)

    def watch(self) -> None:
        """Lets the watchdog follow the work now on the current stream (after replaying a captured graph)."""
        self._comm.watch(self._stream())

    def synchronize(self) -> None:
        """Waits for this communicator's operations; raises NcclTimeoutError/NcclError if one failed."""
        self._comm.synchronize()

    def check(self) -> None:
        """Raises if the communicator was aborted (timeout, peer failure) or NCCL reports an error."""
        self._comm.check()

    def close(self) -> None:
        """Waits for pending operations, then destroys the communicator (every rank should call it)."""
        self._comm.close()

    def __enter__(self) -> NcclCommunicator:
        return self

    def __exit__(self, *exc_info) -> None:
        self._comm.__exit__(*exc_info)
