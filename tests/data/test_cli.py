"""megalith-data corpus / inspect / merge, and that megalith.data never imports torch."""

from __future__ import annotations

import json
import os
import re
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
    assert main(["inspect", str(tmp_path / "a")]) == 2
    assert "a.idx: truncated index" in capsys.readouterr().err


def test_megalith_data_does_not_import_torch():
    code = (
        "import sys, megalith.data, megalith.data.preprocess, megalith.data.cli, megalith.data.tokenizer_cli\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('megalith.core', 'megalith.training'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _dataset(prefix, documents, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in documents:
            writer.add_document(doc)
    return str(prefix)


def test_merge_keeps_a_dataset_that_has_been_trained_on(tmp_path, capsys):
    """Training leaves `prefix/cache/`; merge must still read `prefix` as the dataset, not as an empty folder."""
    from megalith.data import GPTDataset, GPTDatasetConfig

    a = _dataset(tmp_path / "a", [[1, 2, 3, 4, 5, 6]])
    b = _dataset(tmp_path / "b", [[7], [8, 9]])
    GPTDataset(a, num_samples=2, config=GPTDatasetConfig(seq_length=2))
    assert (tmp_path / "a" / "cache").is_dir()
    assert main(["merge", "--input", a, b, "--output-prefix", str(tmp_path / "m")]) == 0
    merged = IndexedDataset(tmp_path / "m")
    assert [s.tolist() for s in merged[0 : len(merged)]] == [[1, 2, 3, 4, 5, 6], [7], [8, 9]]
    assert "merged 2 datasets" in capsys.readouterr().out


def test_merge_inputs_that_name_no_dataset_are_errors(tmp_path, capsys):
    a = _dataset(tmp_path / "a", [[1, 2]])
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "out" / "m")
    cases = [
        (str(tmp_path / "empty"), r"merge input '.*empty' is a folder without datasets \(no \*.idx files in it\)"),
        (str(tmp_path / "nope"), r"merge input '.*nope' names no dataset: .*nope.bin / .*nope.idx do not exist"),
    ]
    for missing, message in cases:
        assert main(["merge", "--input", a, missing, "--output-prefix", out]) == 2
        err = capsys.readouterr().err
        assert re.fullmatch(f"megalith-data: error: {message}\n", err), err
    assert not (tmp_path / "out").exists()
    # A name that is a dataset and a folder of datasets at once is ambiguous; a trailing / picks the folder.
    _dataset(tmp_path / "a" / "inner", [[5]])
    assert main(["merge", "--input", a, "--output-prefix", out]) == 2
    assert "is both a dataset" in capsys.readouterr().err
    assert main(["merge", "--input", a + os.sep, "--output-prefix", out]) == 0
    assert IndexedDataset(out)[0].tolist() == [5]


def test_merge_and_corpus_do_not_overwrite_without_force(tmp_path, capsys):
    a = _dataset(tmp_path / "a", [[1, 2]])
    b = _dataset(tmp_path / "b", [[3]])
    out = str(tmp_path / "m")
    assert main(["merge", "--input", a, "--output-prefix", out]) == 0
    before = (tmp_path / "m.bin").read_bytes()
    assert main(["merge", "--input", a, b, "--output-prefix", out]) == 2
    assert (
        capsys.readouterr().err
        == f"megalith-data: error: output {out}.bin already exists; pass --force to overwrite it\n"
    )
    assert (tmp_path / "m.bin").read_bytes() == before
    assert main(["merge", "--input", a, b, "--output-prefix", out, "--force"]) == 0
    assert IndexedDataset(out)[1].tolist() == [3]
    # Never over one of its own inputs, even with --force.
    assert main(["merge", "--input", a, b, "--output-prefix", b, "--force"]) == 2
    assert f"output {b}.bin is also an input ({b}.bin)" in capsys.readouterr().err
    assert IndexedDataset(b)[0].tolist() == [3]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("keep me\n")
    assert main(["corpus", "stdlib", "--out", str(corpus), "--max-documents", "2"]) == 2
    assert "corpus.jsonl already exists; pass --force" in capsys.readouterr().err
    assert corpus.read_text() == "keep me\n"
    assert main(["corpus", "stdlib", "--out", str(corpus), "--max-documents", "2", "--force"]) == 0
    assert len(corpus.read_text().splitlines()) == 2


def test_inspect_reports_the_id_range_and_marks_ids_the_tokenizer_does_not_know(tmp_path, capsys):
    prefix = _dataset(tmp_path / "d", [[104, 105, 300, 33, 999]])
    args = ["inspect", prefix, "--tokenizer-type", "ByteTokenizer"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ids        min 33  max 999  (NOT all within the tokenizer's 258 ids)" in out
    assert "[0] 5 tokens: 'hi<unknown id 300>!<unknown id 999>'" in out
    assert main(["inspect", _dataset(tmp_path / "ok", [[104, 105]]), "--tokenizer-type", "ByteTokenizer"]) == 0
    out = capsys.readouterr().out
    assert "ids        min 104  max 105  (all within the tokenizer's 258 ids)" in out and "'hi'" in out
