"""Direct NCCL: the library loaded at run time, unique ids, and a communicator on raw device pointers.

This module needs neither torch nor a GPU to import, and `version()`, `library_path()` and `unique_id()` work
on a machine without a GPU. `Communicator` needs a CUDA build of megalith-kernels and a CUDA device; buffers
are device pointers (ints), counts are element counts, dtypes are names (``"bfloat16"``) or NCCL codes, and
every operation is enqueued on the CUDA stream handle given (``torch.cuda.current_stream().cuda_stream``).
`megalith.core.distributed.nccl_comm` builds one over a torch process group and takes tensors.

libnccl.so.2 is searched for, once per process, in this order:

1. the path in the environment variable ``MEGALITH_NCCL_LIBRARY`` (a file, or a directory holding
   libnccl.so.2); when it is set and cannot be loaded, that is an error and nothing else is tried;
2. the ``nvidia-nccl-cu12`` / ``nvidia-nccl-cu13`` wheel installed in this Python environment
   (``pip install 'megalith-kernels[nccl]'`` or ``'megalith-kernels[nccl-cu13]'``);
3. the system library path (``LD_LIBRARY_PATH``, the ld.so cache); a libnccl.so.2 already loaded into the
   process, e.g. by a CUDA build of torch, is found here.

NCCL older than `MIN_VERSION` (2.18.1) is refused; buffer registration needs 2.19.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator
from importlib import metadata

from megalith.kernels import _C

_N = _C.nccl

__all__ = [
    "DEFAULT_TIMEOUT",
    "DTYPES",
    "LIBRARY_ENV",
    "MIN_VERSION",
    "OPS",
    "UNIQUE_ID_BYTES",
    "Communicator",
    "NcclError",
    "NcclLibraryError",
    "NcclTimeoutError",
    "group",
    "group_end",
    "group_start",
    "has_communicator",
    "library_info",
    "library_path",
    "mem_alloc",
    "mem_free",
    "unique_id",
    "version",
]

NcclError = _N.NcclError
NcclLibraryError = _N.NcclLibraryError
NcclTimeoutError = _N.NcclTimeoutError
LIBRARY_ENV: str = _N.LIBRARY_ENV
MIN_VERSION: tuple[int, int, int] = tuple(_N.MIN_VERSION)
DTYPES: dict[str, int] = dict(_N.DTYPES)
OPS: dict[str, int] = dict(_N.OPS)
UNIQUE_ID_BYTES = 128
DEFAULT_TIMEOUT = 600.0
# The wheels that ship libnccl.so.2. Both install it as nvidia/nccl/lib/libnccl.so.2, so when both are present
# (a CUDA 13 torch pulls in -cu13 beside a -cu12 asked for by hand) the file on disk is the last one installed.
_WHEELS = ("nvidia-nccl-cu12", "nvidia-nccl-cu13")


def _wheel_dirs() -> list[tuple[str, str, str]]:
    """(wheel name, directory holding libnccl.so.2, wheel version) of the nvidia-nccl wheels installed here."""
    found: list[tuple[str, str, str]] = []
    for name in _WHEELS:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for file in dist.files or []:
            if file.name == _N.LIBRARY_NAME:
                found.append((name, os.path.dirname(str(file.locate())), dist.version))
    return found


def _owning_wheel(path: str, loaded: tuple[int, ...]) -> str | None:
    """The installed wheel that `path` came from: among the wheels that install that file, the one whose version
    matches the loaded library's (two wheels can share the file; see `_WHEELS`), else the first of them."""
    loaded_dir = os.path.realpath(os.path.dirname(path))
    owners = [(name, ver) for name, d, ver in _wheel_dirs() if os.path.realpath(d) == loaded_dir]
    matching = [name for name, ver in owners if _version_numbers(ver) == tuple(loaded)]
    return (matching or [name for name, _ in owners] or [None])[0]


def _version_numbers(text: str) -> tuple[int, ...]:
    """(major, minor, patch) of a wheel version such as '2.21.5' or '2.27.3.post1'."""
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _load() -> None:
    """Loads libnccl unless this process already has (the compiled module keeps it for the process)."""
    if not _N.is_loaded():
        _N.load(os.environ.get(LIBRARY_ENV, ""), list(dict.fromkeys(d for _, d, _ in _wheel_dirs())))


def library_info() -> dict:
    """Loads NCCL if needed (see the module docstring for the search order) and describes it.

    Returns:
        A dict with ``path`` (the file loaded), ``source`` (``"MEGALITH_NCCL_LIBRARY"``, ``"wheel"`` or
        ``"system"``), ``wheel`` (the nvidia-nccl wheel it came from, or None), ``version`` (a
        (major, minor, patch) tuple) and ``registration`` (whether ncclCommRegister/ncclMemAlloc exist).

    Raises:
        NcclLibraryError: no usable libnccl.so.2 was found, or it is older than `MIN_VERSION`.
    """
    _load()
    info = dict(_N.library_info())
    info["wheel"] = None
    if info["source"] == "wheel":
        info["wheel"] = _owning_wheel(info["path"], tuple(info["version"]))
    return info


def version() -> tuple[int, int, int]:
    """The (major, minor, patch) version of the NCCL library loaded."""
    _load()
    return tuple(_N.library_info()["version"])


def library_path() -> str:
    """The path of the libnccl.so.2 loaded."""
    _load()
    return _N.library_info()["path"]


def unique_id() -> bytes:
    """A new NCCL unique id (128 bytes): made on one rank, handed to every rank that joins the communicator."""
    _load()
    return _N.unique_id()


def _dtype_code(dtype: str | int) -> int:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not an NCCL type; choose from {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return int(dtype)


def _op_code(op: str | int) -> int:
    if isinstance(op, str):
        if op not in OPS:
            raise ValueError(f"op {op!r} is not an NCCL reduction; choose from {', '.join(OPS)}")
        return OPS[op]
    return int(op)


class Communicator:
    """An NCCL communicator: one per rank, all made from the same unique id.

    Creation does not block past `timeout`: when the other ranks have not all joined by then, it raises
    `NcclTimeoutError`. Each operation is enqueued on `stream` and returns; a watchdog thread follows it and,
    when it has not completed `timeout` seconds after being enqueued or NCCL reports an asynchronous error
    (a peer died, a network failure), aborts the communicator, which also ends NCCL kernels still waiting on
    the GPU. The next call on the communicator, or `synchronize()`, then raises `NcclTimeoutError` or
    `NcclError`; an aborted communicator stays unusable. Operations captured in a CUDA graph are not
    followed; call `watch(stream)` after replaying the graph.

    Args:
        unique_id: the 128 bytes of `unique_id()` made on one rank.
        rank: this process's rank in [0, size).
        size: number of ranks.
        device: CUDA device index this rank uses.
        timeout: seconds after which an operation that has not completed aborts the communicator.
    """

    def __init__(self, unique_id: bytes, rank: int, size: int, device: int, *, timeout: float = DEFAULT_TIMEOUT):
        if not isinstance(unique_id, bytes | bytearray) or len(unique_id) != UNIQUE_ID_BYTES:
            got = f"{len(unique_id)} bytes" if isinstance(unique_id, bytes | bytearray) else type(unique_id).__name__
            raise ValueError(f"unique_id must be the {UNIQUE_ID_BYTES} bytes of nccl.unique_id(), got {got}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not isinstance(rank, int) or not 0 <= rank < size:
            raise ValueError(f"rank must be an int in [0, {size}), got {rank!r}")
        if not isinstance(device, int) or device < 0:
            raise ValueError(f"device must be a CUDA device index >= 0, got {device!r}")
        if not isinstance(timeout, int | float) or not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        _load()
        if not _N.HAS_COMMUNICATOR:
            raise RuntimeError(
                "megalith-kernels was built without CUDA, so it has no NCCL communicator; rebuild with "
                "MEGALITH_CUDA=ON (version(), library_path() and unique_id() work without it)"
            )
        self._comm = _N.Communicator(bytes(unique_id), rank, size, device, float(timeout))

    rank = property(lambda self: self._comm.rank, doc="This process's rank.")
    size = property(lambda self: self._comm.size, doc="Number of ranks.")
    device = property(lambda self: self._comm.device, doc="CUDA device index.")
    timeout = property(lambda self: self._comm.timeout, doc="Seconds before an unfinished operation aborts.")
    closed = property(lambda self: self._comm.closed, doc="Whether close() has run.")
    failure = property(lambda self: self._comm.failure, doc="Why the communicator was aborted ('' if it was not).")

    def all_reduce(self, send: int, recv: int, count: int, dtype: str | int, op: str | int, stream: int) -> None:
        """recv[i] = op over ranks of send[i] (`count` elements; send == recv reduces in place)."""
        self._comm.all_reduce(send, recv, count, _dtype_code(dtype), _op_code(op), stream)

    def reduce_scatter(
        self, send: int, recv: int, recv_count: int, dtype: str | int, op: str | int, stream: int
    ) -> None:
        """recv = this rank's `recv_count`-element block of op over ranks of send (size * recv_count elements)."""
        self._comm.reduce_scatter(send, recv, recv_count, _dtype_code(dtype), _op_code(op), stream)

    def all_gather(self, send: int, recv: int, send_count: int, dtype: str | int, stream: int) -> None:
        """recv (size * send_count elements) = every rank's send, in rank order."""
        self._comm.all_gather(send, recv, send_count, _dtype_code(dtype), stream)

    def broadcast(self, send: int, recv: int, count: int, dtype: str | int, root: int, stream: int) -> None:
        """recv = root's send on every rank (send is read on the root only; send == recv is in place)."""
        self._comm.broadcast(send, recv, count, _dtype_code(dtype), root, stream)

    def send(self, buffer: int, count: int, dtype: str | int, peer: int, stream: int) -> None:
        """Sends `count` elements to `peer` (matched by a recv there; batch pairs inside `group()`)."""
        self._comm.send(buffer, count, _dtype_code(dtype), peer, stream)

    def recv(self, buffer: int, count: int, dtype: str | int, peer: int, stream: int) -> None:
        """Receives `count` elements from `peer`."""
        self._comm.recv(buffer, count, _dtype_code(dtype), peer, stream)

    def register(self, buffer: int, nbytes: int) -> int:
        """Registers a device buffer with NCCL (ncclCommRegister, NCCL >= 2.19); returns its handle."""
        return self._comm.register_buffer(buffer, nbytes)

    def deregister(self, handle: int) -> None:
        """Undoes `register` (before the buffer is freed)."""
        self._comm.deregister_buffer(handle)

    def watch(self, stream: int) -> None:
        """Follows the work now enqueued on `stream` like an operation (use after a CUDA graph replay)."""
        self._comm.watch(stream)

    def synchronize(self) -> None:
        """Waits for every followed operation; raises NcclTimeoutError/NcclError if one failed or timed out."""
        self._comm.synchronize()

    def check(self) -> None:
        """Raises if the communicator has been aborted or NCCL reports an asynchronous error."""
        self._comm.check()

    def abort(self, reason: str = "abort() was called") -> None:
        """Aborts now (ncclCommAbort); later calls raise NcclError naming `reason`."""
        self._comm.abort(reason)

    def close(self) -> None:
        """Waits for followed operations, then finalizes and destroys the communicator (every rank should)."""
        self._comm.close()

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc_info) -> None:
        if exc_info[0] is None:
            self.close()
        else:
            self.abort(f"the with-block raised {exc_info[0].__name__}")
            self.close()


def group_start() -> None:
    """Starts an NCCL group on this thread: operations are queued until the matching `group_end()`."""
    _load()
    _require_communicator()
    _N.group_start()


def group_end() -> None:
    """Ends an NCCL group; at the outermost end NCCL launches everything queued, fused."""
    _require_communicator()
    _N.group_end()


@contextlib.contextmanager
def group() -> Iterator[None]:
    """``with nccl.group():`` batches the operations inside (e.g. matching sends and receives) into one launch."""
    group_start()
    try:
        yield
    finally:
        group_end()


def mem_alloc(nbytes: int, device: int) -> int:
    """Device memory from ncclMemAlloc (NCCL >= 2.19), which every NCCL transport can register."""
    _load()
    _require_communicator()
    return _N.mem_alloc(nbytes, device)


def mem_free(ptr: int, device: int) -> None:
    """Frees memory from `mem_alloc`."""
    _require_communicator()
    _N.mem_free(ptr, device)


def has_communicator() -> bool:
    """Whether this build has the communicator (CUDA builds); the library functions work in every build."""
    return bool(_N.HAS_COMMUNICATOR)


def _require_communicator() -> None:
    if not _N.HAS_COMMUNICATOR:
        raise RuntimeError("megalith-kernels was built without CUDA; NCCL groups and memory need a CUDA build")
