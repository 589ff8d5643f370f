"""`option`: a dataclass field with its help text, the one way config fields are documented in Megalith."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["option"]

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, help: str, factory: Any = _MISSING) -> Any:
    """A dataclass field whose help text (`--help`, generated docs) lives in its metadata.

    Use `factory` for mutable or nested defaults; leave both out for a required field.
    """
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})
