"""megalith.training: see packages/training/README.md."""

from __future__ import annotations

from importlib import metadata as _metadata

__version__ = _metadata.version("megalith-training")
