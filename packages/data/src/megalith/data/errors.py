"""What the data commands share about failing well: one-line errors naming the file, and no silent overwrites."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator

__all__ = [
    "MissingPackageError",
    "describe",
    "names_file",
    "refuse_overwrite",
    "run_command",
    "stop_on_sigterm",
]


class MissingPackageError(ImportError):
    """An optional library is not installed; the message names the pip extra that installs it."""

    def __init__(self, what: str, module: str, extra: str) -> None:
        super().__init__(f"{what} needs the {module} library: pip install 'megalith-data[{extra}]'", name=module)


# The errors a user can fix (bad input, a full or read-only disk, a missing file or library). Anything else is a
# bug and keeps its traceback.
EXPECTED_ERRORS = (ValueError, OSError, EOFError, MissingPackageError)

_OS_MESSAGES = {
    errno.ENOSPC: "no space left on {path}",
    errno.EDQUOT: "disk quota exceeded on {path}",
    errno.EROFS: "{path} is on a read-only file system",
    errno.EACCES: "permission denied: {path}",
    errno.EPERM: "operation not permitted: {path}",
}


def describe(exc: BaseException) -> str:
    """The one-line message for an expected error; OS errors are phrased from their errno and file."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.filename is not None:
        path = os.fspath(exc.filename)
        template = _OS_MESSAGES.get(exc.errno)
        if template is not None:
            return template.format(path=path)
        return f"{path}: {exc.strerror or os.strerror(exc.errno)}"
    return str(exc) or type(exc).__name__


@contextlib.contextmanager
def names_file(path) -> Iterator[None]:
    """Adds `path` to OS errors raised without a file name (a write that fills the disk names no file)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), os.fspath(path)) from exc
        raise


def refuse_overwrite(outputs: Iterable, inputs: Iterable = (), force: bool = False) -> None:
    """Raises FileExistsError when an output exists (unless `force`) or is one of the inputs (even with `force`).

    Inputs are compared with the outputs as files (`os.path.samefile`), so links and other spellings of the same
    path count too.
    """
    inputs = [os.fspath(p) for p in inputs]
    for output in map(os.fspath, outputs):
        if not os.path.lexists(output):
            continue
        for source in inputs:
            if os.path.exists(source) and os.path.exists(output) and os.path.samefile(source, output):
                raise FileExistsError(f"output {output} is also an input ({source}); write the output somewhere else")
        if not force:
            raise FileExistsError(f"output {output} already exists; pass --force to overwrite it")


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def stop_on_sigterm() -> None:
    """SIGTERM stops a command the way Ctrl-C does, so its temporary files are removed on the way out."""
    signal.signal(signal.SIGTERM, _terminate)


def run_command(prog: str, command: Callable[[], int]) -> int:
    """Runs a command's body; expected errors print `prog: error: message` and return 2, Ctrl-C returns 130.

    Every output is written under a temporary name and renamed into place only when complete, so a failed or
    interrupted command leaves none behind.
    """
    try:
        return command()
    except KeyboardInterrupt as exc:
        print(f"{prog}: interrupted ({exc or 'Ctrl-C'}); no output was written", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as exc:
        print(f"{prog}: error: {describe(exc)}", file=sys.stderr)
        return 2
