"""megalith-data corpus / inspect / merge, and that megalith.data never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np

from megalith.data import IndexedDataset, IndexedDatasetWriter
from megalith.data.cli import main


def test_stdlib_corpus_is_real_python_source(corpus):
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert len(records) == 60 and len({r["path"] for r in records}) == 60
    root = Path(sysconfig.get_paths()["stdlib"])
    for record in records[:5]:
        assert record["path"].endswith(".py")
        assert (root / record["path"]).read_text(encoding="utf-8") == record["text"]


def test_inspect_and_merge(tmp_path, capsys):
    for name, docs in (("a", [[1, 2, 3]]), ("b", [[4], [5, 6]])):
        with IndexedDatasetWriter(tmp_path / name, np.uint16) as writer:
            for doc in docs:
                writer.add_document(doc)
    assert main(["merge", "--input", str(tmp_path), "--output-prefix", str(tmp_path / "out" / "m")]) == 0
    assert [s.tolist() for s in IndexedDataset(tmp_path / "out" / "m")[0:3]] == [[1, 2, 3], [4], [5, 6]]
    capsys.readouterr()
    assert (
        main(
            [
                "inspect",
                str(tmp_path / "out" / "m"),
                "--tokenizer-type",
                "NullTokenizer",
                "--vocab-size",
                "10",
                "--show",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "sequences  3" in out and "tokens     6" in out and "[1] 1 tokens: '4'" in out
    (tmp_path / "a.idx").write_bytes(b"garbage")
    assert main(["inspect", str(tmp_path / "a")]) == 1
    assert "a.idx: truncated index" in capsys.readouterr().err


def test_megalith_data_does_not_import_torch():
    code = (
        "import sys, megalith.data, megalith.data.preprocess, megalith.data.cli, megalith.data.tokenizer_cli\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('megalith.core', 'megalith.training'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
