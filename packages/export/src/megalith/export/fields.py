"""Typed reads of the fields of a JSON file (config.json and the like); errors name the file, the field and the value.

JSON types are taken as written: "false" is a string, not a bool, and 4.0 is a number, not an integer. A field that
is absent or null takes its default (None included); without a default it is required.
"""

from __future__ import annotations

import json
import math
import os

from megalith.export.spec import ConversionError

_REQUIRED = object()


def show(value: object, limit: int = 60) -> str:
    """`value` as the JSON file spells it, cut short when long."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Fields:
    """The fields of one JSON object read from `path` (or of an object nested in it under the field `name`)."""

    def __init__(self, doc: object, path: str | os.PathLike, name: str | None = None):
        if not isinstance(doc, dict):
            where = (
                f"field {name!r} = {show(doc)} is not a JSON object"
                if name
                else f"expected a JSON object, got {show(doc)}"
            )
            raise ConversionError(f"{path}: {where}")
        self.doc, self.path, self._prefix = doc, path, f"{name}." if name else ""

    def _get(self, key: str, default: object) -> object:
        value = self.doc.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ConversionError(f"{self.path}: lacks the field {self._prefix + key!r}")
            return default
        return value

    def _bad(self, key: str, value: object, kind: str) -> ConversionError:
        return ConversionError(f"{self.path}: field {self._prefix + key!r} = {show(value)} is not {kind}")

    def has(self, key: str) -> bool:
        return self.doc.get(key) is not None

    def boolean(self, key: str, default: object = _REQUIRED) -> bool | None:
        value = self._get(key, default)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self._bad(key, value, "a JSON bool (true or false)")
        return value

    def integer(self, key: str, default: object = _REQUIRED, *, minimum: int = 1) -> int | None:
        """An integer >= `minimum` (a positive one unless told otherwise)."""
        value = self._get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._bad(key, value, "a positive integer" if minimum == 1 else f"an integer >= {minimum}")
        return value

    def number(self, key: str, default: object = _REQUIRED, *, positive: bool = False) -> float | None:
        """A finite number (an integer is accepted), greater than 0 when `positive`."""
        value = self._get(key, default)
        if value is None:
            return None
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (positive and value <= 0):
            raise self._bad(key, value, "a positive finite number" if positive else "a finite number")
        return float(value)

    def string(self, key: str, default: object = _REQUIRED) -> str | None:
        value = self._get(key, default)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._bad(key, value, "a string")
        return value

    def strings(self, key: str, default: object = _REQUIRED) -> list[str] | None:
        value = self._get(key, default)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, value, "a list of strings")
        return value

    def token_ids(self, key: str) -> int | list[int]:
        """A token id (an integer >= 0) or a non-empty list of them (Llama 3 lists several eos ids)."""
        value = self._get(key, _REQUIRED)
        ids = value if isinstance(value, list) and value else [value]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise self._bad(key, value, "a token id (an integer >= 0) or a list of them")
        return value

    def nested(self, key: str) -> Fields | None:
        """The JSON object in field `key` (None when absent or null)."""
        value = self._get(key, None)
        return None if value is None else Fields(value, self.path, self._prefix + key)
