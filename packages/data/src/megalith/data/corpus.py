"""The embedded default corpus: the running Python's standard-library sources, one document per file."""

from __future__ import annotations

import json
import os
import sysconfig
import tempfile
from pathlib import Path

from megalith.data.cache import make_shareable

__all__ = ["stdlib_files", "write_stdlib_corpus"]


def stdlib_files() -> list[Path]:
    """Every `.py` file of the standard library (not site-packages), sorted for a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if "site-packages" in parts or "dist-packages" in parts:
            continue
        files.append(path)
    if not files:
        raise FileNotFoundError(f"no standard-library sources under {root}")
    return files


def write_stdlib_corpus(out, max_documents: int | None = None) -> dict:
    """Writes `{"text": source, "path": relative path}` per line to `out` (atomically); returns counts."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()[:max_documents]
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    documents = size = 0
    try:
        make_shareable(tmp)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for path in files:
                try:
                    text = path.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue  # a few test fixtures are deliberately not UTF-8
                line = json.dumps({"text": text, "path": str(path.relative_to(root))}, ensure_ascii=False)
                handle.write(line + "\n")
                documents += 1
                size += len(line) + 1
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return {"documents": documents, "bytes": size, "path": str(out)}
