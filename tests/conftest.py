"""Shared pytest configuration: the `cuda` marker skips tests when no GPU can run Megalith's CUDA kernels, the
`te` marker when NVIDIA Transformer Engine does not import, and `--test-timeout SECONDS` fails any test that runs
longer (benchmarks/gpu_report.py runs the GPU tests with it)."""

from __future__ import annotations

import contextlib
import signal

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--test-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="fail a test whose call phase runs longer than this (SIGALRM: it interrupts Python code, not a "
        "blocking C call; run pytest under `timeout` as well when a kernel could hang)",
    )


class TimeLimitExceeded(Exception):
    """A test ran past --test-timeout."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = item.config.getoption("--test-timeout")
    if not limit:
        yield
        return

    def expire(signum, frame):
        raise TimeLimitExceeded(f"{item.nodeid} ran past --test-timeout {limit:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGALRM, previous)


def _cuda_skip_reason() -> str | None:
    try:
        import megalith.kernels as kernels
    except ImportError as exc:  # pragma: no cover - the package is always installed by `make test`
        return f"megalith.kernels cannot be imported: {exc}"
    if not kernels.build_info()["cuda"]:
        return "megalith-kernels was built without CUDA"
    if not kernels.cuda_available():
        return f"no CUDA GPU: {kernels.cuda_unavailable_reason()}"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch cannot see a CUDA device"
    return None


def _te_skip_reason() -> str | None:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # not installed, or its CUDA libraries fail to load
        return f"transformer_engine does not import ({type(exc).__name__})"
    return None


def pytest_collection_modifyitems(config, items):
    te_items = [item for item in items if item.get_closest_marker("te") is not None]
    te_reason = _te_skip_reason() if te_items else None
    for item in te_items if te_reason else ():
        item.add_marker(pytest.mark.skip(reason=f"needs NVIDIA Transformer Engine: {te_reason}"))
    cuda_items = [item for item in items if "cuda" in item.keywords]
    if not cuda_items:
        return
    reason = _cuda_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU ({reason})")
    for item in cuda_items:
        item.add_marker(skip)
