"""--out never replaces, contains or lies inside an input, even with --force; inputs survive every refusal."""

from __future__ import annotations

import pytest
import torch

from megalith.export.cli import export_main, import_main
from megalith.export.hf import export_hf
from megalith.export.io import write_canonical_dir
from megalith.export.mapping import entries
from megalith.export.spec import ConversionError, model_config_from_dict
from megalith.export.trtllm import export_trtllm
from tests.export.common import CONFIGS, DictSource, random_tensors


def _snapshot(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def inputs(tmp_path):
    cfg = CONFIGS["llama_gqa"]
    tensors = random_tensors(cfg, seed=3)
    hf = export_hf(DictSource(cfg, tensors), tmp_path / "models" / "hf", dtype=torch.float32, progress=False)
    order = [e.canonical for e in entries(model_config_from_dict(cfg))]
    canon = tmp_path / "models" / "canon"
    write_canonical_dir(canon, cfg, ((n, tensors[n]) for n in order))
    return hf, canon


def _refusal(out, relation: str, src) -> str:
    return f"output {out} {relation} the input {src}; choose another output directory (--force does not override this)"


def test_export_refuses_an_output_overlapping_its_source(inputs, capsys):
    canon = inputs[1]
    before = _snapshot(canon)
    (canon.parent / "link").symlink_to(canon, target_is_directory=True)
    cases = [(canon, "is"), (canon.parent, "contains"), (canon / "sub", "lies inside"), (canon.parent / "link", "is")]
    for command in ("hf", "trtllm"):
        for out, relation in cases:
            assert export_main([command, "--load", str(canon), "--out", str(out), "--force", "--quiet"]) == 2
            assert capsys.readouterr().err == f"megalith-export: error: {_refusal(out, relation, canon)}\n"
    assert _snapshot(canon) == before
    assert sorted(p.name for p in canon.parent.iterdir()) == ["canon", "hf", "link"]


def test_import_refuses_an_output_overlapping_its_source(inputs, capsys):
    hf = inputs[0]
    before = _snapshot(hf)
    for out, relation in [(hf, "is"), (hf.parent, "contains"), (hf / "ckpt", "lies inside")]:
        for fmt in ("canonical", "checkpoint"):
            argv = ["hf", "--hf", str(hf), "--out", str(out), "--format", fmt, "--force"]
            assert import_main(argv) == 2
            assert capsys.readouterr().err == f"megalith-import: error: {_refusal(out, relation, hf)}\n"
    assert _snapshot(hf) == before
    assert sorted(p.name for p in hf.parent.iterdir()) == ["canon", "hf"]


def test_export_functions_also_protect_the_tokenizer_folder(tmp_path):
    cfg = CONFIGS["gpt_tied"]
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    source = DictSource(cfg, random_tensors(cfg), tok)
    with pytest.raises(ConversionError, match=f"output {tmp_path} contains the input {tok}"):
        export_hf(source, tmp_path, force=True, progress=False)
    with pytest.raises(ConversionError, match=f"output {tok} is the input {tok}"):
        export_trtllm(source, tok, force=True, progress=False)
    assert (tok / "tokenizer.json").read_text() == "{}"


def test_export_refuses_an_output_inside_the_checkpoint_it_reads(inputs, tmp_path, capsys):
    hf = inputs[0]
    ckpt = tmp_path / "run" / "checkpoints"
    assert import_main(["hf", "--hf", str(hf), "--out", str(ckpt)]) == 0
    iteration = next(p for p in ckpt.iterdir() if p.is_dir())
    before = _snapshot(ckpt)
    for out, relation, src in [
        (ckpt, "is", ckpt),
        (iteration, "lies inside", ckpt),
        (tmp_path / "run", "contains", ckpt),
    ]:
        assert export_main(["hf", "--load", str(ckpt), "--out", str(out), "--force", "--quiet"]) == 2
        assert capsys.readouterr().err == f"megalith-export: error: {_refusal(out, relation, src)}\n"
    assert _snapshot(ckpt) == before
