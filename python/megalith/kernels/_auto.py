"""kernels="auto": per op, device type and dtype, whether the fused kernel or plain torch is faster.

The answers come from `auto_table.json` next to this file, which `benchmarks/kernels.py --write-auto-table`
measures and writes (forward + backward of each op at a training shape, fused against the torch ops the model
uses otherwise). Anything the table does not hold is answered "torch". Reading it needs no torch.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

AUTO_TABLE = Path(__file__).with_name("auto_table.json")
OPS = ("attention", "bias_gelu", "cross_entropy", "layer_norm", "rms_norm", "rope", "scaled_softmax", "swiglu")
_CHOICES = ("fused", "torch")


def _parse(path: Path, table: Any) -> dict[tuple[str, str, str], str]:
    if not isinstance(table, dict) or table.get("format") != 1:
        found = table.get("format") if isinstance(table, dict) else type(table).__name__
        raise ValueError(f"{path}: expected a kernel auto table of format 1, got format {found!r}")
    entries = table.get("entries")
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: 'entries' must map device types to dtypes to ops")
    choices = {}
    for device, by_dtype in entries.items():
        if not isinstance(by_dtype, dict):
            raise ValueError(f"{path}: entries.{device} must map dtypes to ops")
        for dtype, by_op in by_dtype.items():
            if not isinstance(by_op, dict):
                raise ValueError(f"{path}: entries.{device}.{dtype} must map op names to measurements")
            for op, entry in by_op.items():
                where = f"entries.{device}.{dtype}.{op}"
                if op not in OPS:
                    raise ValueError(f"{path}: {where} names an unknown op (known: {', '.join(OPS)})")
                choice = entry.get("choice") if isinstance(entry, dict) else None
                if choice not in _CHOICES:
                    raise ValueError(f"{path}: {where}.choice must be 'fused' or 'torch', got {choice!r}")
                choices[device, dtype, op] = choice
    return choices


@functools.cache
def _load(path: Path) -> dict[tuple[str, str, str], str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}  # nothing measured: every answer is "torch"
    try:
        table = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return _parse(path, table)


def auto_choice(op: str, device_type: Any, dtype: Any, *, table: str | Path | None = None) -> str:
    """Whether `op` should run Megalith's fused kernel or the plain torch ops on this device type and dtype.

    Args:
        op: an op of `megalith.kernels.ops`: attention, bias_gelu, cross_entropy, layer_norm, rms_norm, rope,
            scaled_softmax or swiglu.
        device_type: "cpu", "cuda", ... (or a torch.device).
        dtype: a torch dtype or its name ("float32", "bfloat16", ...).
        table: another measured table to read instead of the packaged auto_table.json.

    Returns:
        "fused" when the table says the fused forward + backward was at least as fast as torch's there,
        "torch" when it was slower or when that combination was never measured.

    Raises:
        ValueError: for an unknown op, or a table file that is not a valid auto table (naming the file).
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; the fused kernels are {', '.join(OPS)}")
    device = str(getattr(device_type, "type", device_type))
    dtype_name = str(dtype).removeprefix("torch.")
    choices = _load(Path(table) if table is not None else AUTO_TABLE)
    return choices.get((device, dtype_name, op), "torch")
