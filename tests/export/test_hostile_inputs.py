"""Hostile inputs beyond single damaged files: configs that imply huge models, links smuggling files in, bad token
ids, control characters in messages, and outputs that cannot be written. Each is a one-line error, never a
traceback, unbounded memory or a file read from outside the input folder."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from megalith.export.cli import export_main, import_main, parse_size
from megalith.export.hf import export_hf
from megalith.export.io import write_canonical_dir
from megalith.export.mapping import entries
from megalith.export.spec import ConversionError, model_config_from_dict
from megalith.export.trtllm import export_trtllm
from tests.export.common import CONFIGS, DictSource, random_tensors


@pytest.fixture
def hf(tmp_path):
    cfg = CONFIGS["llama_gqa"]
    tensors = random_tensors(cfg, seed=4)
    return export_hf(DictSource(cfg, tensors), tmp_path / "hf", dtype=torch.float32, progress=False), cfg, tensors


def _canonical(tmp_path, cfg, tensors, tok=None):
    order = [e.canonical for e in entries(model_config_from_dict(cfg))]
    write_canonical_dir(tmp_path / "canon", cfg, ((n, tensors[n]) for n in order), tokenizer_dir=tok)
    return tmp_path / "canon"


# Runs a CLI with its heap capped 3 GiB above what the imports take, so a hostile config that makes it allocate
# fails fast instead of filling the machine. The cap is on private writable memory (RLIMIT_DATA, which counts
# anonymous mmaps since Linux 4.7), set after the imports: an address-space cap (RLIMIT_AS) would also count the
# GBs of CUDA libraries a CUDA build of torch maps, and starve its BLAS thread pool of stacks.
_CAPPED = textwrap.dedent(
    """
    import resource, sys
    from megalith.export.cli import export_main, import_main
    with open("/proc/self/status") as status:
        data_kib = next(int(line.split()[1]) for line in status if line.startswith("VmData:"))
    cap = (data_kib << 10) + (3 << 30)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    main = import_main if sys.argv[1] == "import" else export_main
    sys.exit(main(sys.argv[2:]))
    """
)


def _run_capped(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CAPPED, *argv], capture_output=True, text=True, timeout=120)


def test_a_config_implying_a_billion_layers_is_refused_before_any_list_is_built(hf, tmp_path):
    path, cfg, tensors = hf
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**9}))
    result = _run_capped("import", "hf", "--hf", str(path), "--out", str(tmp_path / "c"), "--format", "canonical")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr == (
        f"megalith-import: error: {path / 'config.json'}: the config implies at least 9000000003 tensors "
        f"(1000000000 layers), but only 39 are stored\n"
    )
    result = _run_capped("export", "verify", str(path))
    assert result.returncode == 1 and "implies at least 9000000003 tensors" in result.stdout, result.stderr[-2000:]
    canon = _canonical(tmp_path, cfg, tensors)
    doc = json.loads((canon / "megalith.json").read_text())
    doc["model_config"]["num_layers"] = 10**9
    (canon / "megalith.json").write_text(json.dumps(doc))
    result = _run_capped("export", "trtllm", "--load", str(canon), "--out", str(tmp_path / "t"), "--quiet")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr == (
        f"megalith-export: error: {canon}: the config implies at least 6000000003 tensors "
        f"(1000000000 layers), but only 27 are stored\n"
    )


def test_a_trtllm_config_implying_a_huge_world_is_refused(tmp_path):
    big = 2**20  # heads, kv heads, hidden and ffn sizes all divisible by tp = 2**20
    trt = tmp_path / "trt"
    export_trtllm(DictSource(CONFIGS["llama_gqa"], random_tensors(CONFIGS["llama_gqa"])), trt, progress=False)
    config = json.loads((trt / "config.json").read_text())
    config.update(hidden_size=2 * big, num_attention_heads=big, num_key_value_heads=big, head_size=2,
                  intermediate_size=big, mapping={"world_size": big, "tp_size": big})  # fmt: skip
    (trt / "config.json").write_text(json.dumps(config))
    result = _run_capped("export", "verify", str(trt))
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stdout.splitlines()[0] == (
        f"{trt / 'config.json'}: the config implies at least 28311552 tensors (4 layers, tp 1048576), "
        "but only 31 are stored"
    )


def test_export_checks_every_shape_the_source_declares_before_writing(hf, tmp_path, capsys):
    _, cfg, tensors = hf
    canon = _canonical(tmp_path, cfg, tensors)
    doc = json.loads((canon / "megalith.json").read_text())
    doc["model_config"]["vocab_size"] = 10**12  # the output files would be laid out for this many rows
    (canon / "megalith.json").write_text(json.dumps(doc))
    assert export_main(["hf", "--load", str(canon), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        "megalith-export: error: tensor 'embed.weight' has shape [101, 64], the model config implies "
        "[1000000000000, 64]\n"
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_links_out_of_the_folder_are_refused_for_weights_and_tokenizer_files(hf, tmp_path, capsys):
    path, cfg, tensors = hf
    (tmp_path / "secret.json").write_text('{"api_key": "hunter2"}')
    (path / "tokenizer.json").symlink_to(tmp_path / "secret.json")
    out = tmp_path / "c"
    assert import_main(["hf", "--hf", str(path), "--out", str(out), "--format", "canonical"]) == 2
    assert capsys.readouterr().err == (
        f"megalith-import: error: {path / 'tokenizer.json'}: resolves to {tmp_path / 'secret.json'}, "
        f"outside the folder {path}\n"
    )
    assert not out.exists()
    (path / "tokenizer.json").unlink()
    (path / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (path / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    assert import_main(["hf", "--hf", str(path), "--out", str(out), "--format", "canonical"]) == 2
    assert f"{path / 'model.safetensors'}: resolves to {tmp_path / 'elsewhere.safetensors'}, outside the folder" in (
        capsys.readouterr().err
    )
    # A canonical directory whose tokenizer folder is a link to somewhere else.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "tokenizer.json").write_text("{}")
    canon = _canonical(tmp_path, cfg, tensors)
    (canon / "tokenizer").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert export_main(["hf", "--load", str(canon), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"megalith-export: error: {canon / 'tokenizer'}: resolves to {tmp_path / 'elsewhere'}, "
        f"outside the folder {canon}\n"
    )


@pytest.mark.parametrize(
    ("generation", "message"),
    [
        ('{"eos_token_id": "2"}', """field 'eos_token_id' = "2" is not a token id (an integer >= 0) or a list of """
                                  """them"""),
        ('{"bos_token_id": -1}', "field 'bos_token_id' = -1 is not a token id (an integer >= 0) or a list of them"),
        ('{"eos_token_id": [1, true]}', "field 'eos_token_id' = [1, true] is not a token id (an integer >= 0) or a "
                                        "list of them"),
        ("[1]", "expected a JSON object, got [1]"),
        ("{" * 100000, "not valid JSON (maximum recursion depth exceeded while decoding a JSON array from a unicode "
                       "string)"),
    ],
)  # fmt: skip
def test_bad_generation_config_token_ids(generation, message, hf, tmp_path, capsys):
    _, cfg, tensors = hf
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "generation_config.json").write_text(generation)
    canon = _canonical(tmp_path, cfg, tensors, tok)
    assert export_main(["hf", "--load", str(canon), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"megalith-export: error: {canon / 'tokenizer' / 'generation_config.json'}: "), err
    if not generation.startswith("{" * 10):
        assert err == f"megalith-export: error: {canon / 'tokenizer' / 'generation_config.json'}: {message}\n"
    assert err.count("\n") == 1


def test_llama3_eos_lists_are_token_ids(hf, tmp_path):
    _, cfg, tensors = hf
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "generation_config.json").write_text('{"bos_token_id": 0, "eos_token_id": [1, 2]}')
    canon = _canonical(tmp_path, cfg, tensors, tok)
    assert export_main(["hf", "--load", str(canon), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["eos_token_id"] == [1, 2]


def test_control_characters_in_names_are_escaped_and_messages_stay_one_line(hf, tmp_path, capsys):
    path = hf[0]
    files = load_file(path / "model.safetensors")
    files["evil\n\x1b[31mname"] = torch.zeros(1)
    save_file(files, path / "model.safetensors", metadata={"format": "pt"})
    assert import_main(["hf", "--hf", str(path), "--out", str(tmp_path / "c"), "--format", "canonical"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "unexpected ['evil\\n\\x1b[31mname']" in err, err
    assert export_main(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out and "unexpected tensor evil\\n\\x1b[31mname (F32 [1])" in out, out
    weird = tmp_path / "bad\nname\x1b[2J"
    assert import_main(["hf", "--hf", str(weird), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    shown = f"{tmp_path}/bad\\nname\\x1b[2J/config.json"
    assert err == f"megalith-import: error: {shown}: cannot read (No such file or directory)\n"


def test_an_output_that_cannot_be_written_is_a_one_line_error(hf, tmp_path, capsys):
    path = hf[0]
    (tmp_path / "a_file").write_text("")
    for main, argv in ((export_main, ["hf", "--load", str(path)]), (import_main, ["hf", "--hf", str(path)])):
        assert main([*argv, "--out", str(tmp_path / "a_file" / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and str(tmp_path / "a_file") in err, err


def test_force_replaces_a_symlinked_output_without_touching_its_target(hf, tmp_path, capsys):
    path = hf[0]
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep.txt").write_text("kept")
    (tmp_path / "link").symlink_to(tmp_path / "target", target_is_directory=True)
    assert export_main(["hf", "--load", str(path), "--out", str(tmp_path / "link"), "--force", "--quiet"]) == 0
    assert (tmp_path / "target" / "keep.txt").read_text() == "kept"
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "link" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "link", "target"]


def test_huge_shard_sizes_are_argument_errors():
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("9" * 400)
    with pytest.raises(SystemExit) as exc:
        export_main(["hf", "--load", "x", "--out", "y", "--max-shard-size", "9" * 400 + "GB"])
    assert exc.value.code == 2


def test_integer_weights_are_refused_on_import(hf, tmp_path, capsys):
    path = hf[0]
    files = load_file(path / "model.safetensors")
    files["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(files, path / "model.safetensors", metadata={"format": "pt"})
    assert import_main(["hf", "--hf", str(path), "--out", str(tmp_path / "c"), "--format", "canonical"]) == 2
    assert capsys.readouterr().err == (
        f"megalith-import: error: {path / 'model.safetensors'}: tensor 'model.norm.weight' has dtype I32, "
        "expected a floating dtype\n"
    )


class _FailingSource(DictSource):
    def read(self, name):
        if name == "layers.1.mlp.fc2.weight":
            raise ValueError("/ckpt/__0_0.distcp: the stored chunk of 'layers.1.mlp.fc2.weight' is truncated")
        return super().read(name)


def test_read_errors_of_a_source_become_conversion_errors(tmp_path):
    cfg = CONFIGS["gpt_tied"]
    source = _FailingSource(cfg, random_tensors(cfg))
    with pytest.raises(ConversionError, match=r"^tensor 'layers\.1\.mlp\.fc2\.weight': cannot read \(/ckpt/__0_0"):
        export_hf(source, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("how", ["truncated", "zeroed"])
def test_every_damaged_file_of_a_training_checkpoint_is_a_one_line_error(how, hf, tmp_path, capsys):
    """Whatever files the checkpoint format has: each one damaged in turn, export succeeds or fails in one line."""
    ckpt = tmp_path / "ckpt"
    assert import_main(["hf", "--hf", str(hf[0]), "--out", str(ckpt)]) == 0
    files = sorted(p for p in ckpt.rglob("*") if p.is_file())
    assert len(files) >= 3
    failures = 0
    for victim in files:
        raw = victim.read_bytes()
        victim.write_bytes(raw[: len(raw) // 2] if how == "truncated" else bytes(len(raw)))
        capsys.readouterr()
        rc = export_main(["hf", "--load", str(ckpt), "--out", str(tmp_path / "out"), "--force", "--quiet"])
        err = capsys.readouterr().err
        assert rc in (0, 2) and err.count("\n") == (rc == 2) and "Traceback" not in err, (victim, err)
        failures += rc == 2
        victim.write_bytes(raw)
    assert failures >= 2  # at least the model description and the tensor data are needed


def test_symlink_loops_are_one_line_errors(hf, tmp_path, capsys):
    path = hf[0]
    (path / "config.json").unlink()
    (path / "config.json").symlink_to(path / "config.json")
    assert import_main(["hf", "--hf", str(path), "--out", str(tmp_path / "c"), "--format", "canonical"]) == 2
    assert capsys.readouterr().err == f"megalith-import: error: {path / 'config.json'}: cannot resolve (symlink loop)\n"
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    canon = _canonical(tmp_path, CONFIGS["llama_gqa"], hf[2])
    assert export_main(["hf", "--load", str(canon), "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert capsys.readouterr().err == f"megalith-export: error: {tmp_path / 'a'}: cannot resolve (symlink loop)\n"


def test_long_lists_of_unexpected_tensors_are_cut_short(hf, tmp_path, capsys):
    path = hf[0]
    files = load_file(path / "model.safetensors")
    files.update({f"junk.{k:04d}": torch.zeros(1) for k in range(500)})
    save_file(files, path / "model.safetensors", metadata={"format": "pt"})
    assert import_main(["hf", "--hf", str(path), "--out", str(tmp_path / "c"), "--format", "canonical"]) == 2
    err = capsys.readouterr().err
    listed = ", ".join(f"'junk.{k:04d}'" for k in range(20))
    assert err == (
        f"megalith-import: error: {path}: tensors do not match config.json: missing [], unexpected [{listed}] "
        "(and 480 more)\n"
    )
