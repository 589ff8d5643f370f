"""megalith-train against hostile, corrupt or unlucky storage: refusals and one-line errors, nothing lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megalith.core import build_model_chunks
from megalith.core.checkpoint import list_checkpoints, write_model_checkpoint
from megalith.training.cli import main
from megalith.training.config_tree import ConfigError, load_config
from megalith.training.run_config import RunConfig
from tests.core.checkpoint.test_integrity import hostile_payloads
from tests.training.loop_common import BASE

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return [*BASE, "training.train_iters=2", f"logging.run_dir={tmp_path}/run", *extra]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=inf", "optimizer.lr: expected a finite number, got inf"),
        ("optimizer.eps=.inf", "optimizer.eps: expected a finite number, got inf"),
        ("optimizer.beta1=nan", "optimizer.beta1: expected a finite number, got nan"),
        ("schedule.min_lr=-.inf", "schedule.min_lr: expected a finite number, got -inf"),
        ("optimizer.clip_grad=1e400", "optimizer.clip_grad: expected a finite number, got inf"),
    ],
)
def test_non_finite_hyperparameters_are_rejected(override, message, capsys):
    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, None, [override])
    assert main(["--print-config", override]) == 2
    assert message in capsys.readouterr().err


def test_documented_progress_bar_off_is_accepted(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("logging:\n  progress_bar: off\n")  # YAML 1.1 reads `off` as false
    assert load_config(RunConfig, config).logging.progress_bar == "off"
    assert load_config(RunConfig, None, ["logging.progress_bar=on"]).logging.progress_bar == "on"
    assert load_config(RunConfig, None, ["logging.progress_bar=yes"]).logging.progress_bar == "on"
    with pytest.raises(ConfigError, match=r"logging\.progress_bar: 'maybe' is not one of"):
        load_config(RunConfig, None, ["logging.progress_bar=maybe"])


def test_unwritable_save_and_run_dirs_fail_before_the_first_step(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main([*_args(tmp_path), f"checkpoint.save={blocker}/ckpt"]) == 2
    err = capsys.readouterr().err
    assert f"{blocker}/ckpt: checking that checkpoint.save is writable failed" in err and "Traceback" not in err
    assert main([*_args(tmp_path), f"logging.run_dir={blocker}/run"]) == 2
    err = capsys.readouterr().err
    assert f"{blocker}/run: checking that logging.run_dir is writable failed" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_new_run_does_not_take_over_another_runs_checkpoints(tmp_path, capsys):
    save = tmp_path / "ckpt"
    assert main([*_args(tmp_path), f"--save={save}"]) == 0
    first = (save / "latest").read_text()
    assert main([*_args(tmp_path), f"--save={save}", "training.seed=7"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint.save {save} already holds checkpoints of another run (latest iter_0000002)" in err
    assert (save / "latest").read_text() == first
    # Resuming the same run into its own folder is fine, and so is --force.
    assert main([*_args(tmp_path), f"--save={save}", f"--load={save}", "training.train_iters=3"]) == 0
    assert (save / "latest").read_text().strip() == "iter_0000003"
    assert main([*_args(tmp_path), f"--save={save}", "--force", "training.seed=7"]) == 0
    assert (save / "latest").read_text().strip() == "iter_0000002"


def test_null_tokenizer_trains_from_megalith_train(tmp_path):
    data = tmp_path / "docs.jsonl"
    with open(data, "w") as f:
        for i in range(64):
            f.write(json.dumps({"text": " ".join(str((i * 7 + j) % 50) for j in range(40))}) + "\n")
    prefix = tmp_path / "null"
    subprocess.run(
        [BIN / "megalith-preprocess", "--input", data, "--output-prefix", prefix, "--tokenizer-type",
         "NullTokenizer", "--vocab-size", "50", "--append-eod"],
        check=True, capture_output=True,
    )  # fmt: skip
    blend = f"data.blend={prefix}_text_document"
    assert main([*_args(tmp_path), blend, "data.tokenizer_type=NullTokenizer", "data.vocab_size=50"]) == 0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and record["loss"] > 0
    with pytest.raises(ConfigError, match=r"tokenizer_type NullTokenizer needs data\.vocab_size"):
        load_config(RunConfig, None, [blend, "data.tokenizer_type=NullTokenizer"])


_HOSTILE_CLIS = {
    "train": lambda ckpt: [BIN / "megalith-train", *_cli_base(), f"--load={ckpt}"],
    "generate": lambda ckpt: [
        BIN / "megalith-generate",
        "--load",
        ckpt,
        "--prompt",
        "1 2 3",
        "--tokenizer-type",
        "ByteTokenizer",
    ],
    "export": lambda ckpt: [BIN / "megalith-export", "hf", "--load", ckpt, "--out", Path(ckpt).parent / "hf"],
}


def _cli_base() -> list[str]:
    return [*BASE, "training.train_iters=1", "logging.tensorboard=false"]


@pytest.mark.parametrize("cli", sorted(_HOSTILE_CLIS))
def test_the_clis_refuse_a_doctored_checkpoint_without_running_it(tmp_path, cli):
    cfg = load_config(RunConfig, None, _cli_base())
    model = cfg.model
    tensors = _model_tensors(cfg)
    ckpt = write_model_checkpoint(tmp_path / "ckpt", model.to_dict(), tensors.items())
    marker = tmp_path / "pwned"
    payload = hostile_payloads(marker)["builtins.getattr.__self__.__import__"]
    (ckpt / "index.json").unlink()
    (ckpt / ".metadata").write_bytes(payload)  # a 0.1-style DCP checkpoint whose pickle runs `touch`
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    run = subprocess.run(
        [str(a) for a in _HOSTILE_CLIS[cli](ckpt)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert run.returncode != 0
    assert f"{ckpt}/.metadata: a pickle-based" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not list(tmp_path.glob("pwned*"))


def _model_tensors(cfg: RunConfig) -> dict[str, torch.Tensor]:
    (model,) = build_model_chunks(cfg.model)
    return {name: p.detach() for name, p in model.named_parameters()}


_FULL_DISK_SCRIPT = textwrap.dedent(
    """
    set -u
    mount -t tmpfs -o size={size} megalith-test "{mnt}" || exit 77
    "{bin}/megalith-train" {args} --save="{mnt}/ckpt" checkpoint.save_interval=1 checkpoint.keep_last=1 \\
        > "{out}/stdout" 2> "{out}/stderr"
    echo $? > "{out}/rc"
    ls -A "{mnt}/ckpt" > "{out}/listing"
    "{python}" -c 'import sys, torch
    from megalith.core.checkpoint import ModelCheckpointReader
    r = ModelCheckpointReader(sys.argv[1])
    print(r.step, sum(float(r.read(n).double().abs().sum()) for n in r.tensor_names()))' "{mnt}/ckpt" > "{out}/load"
    """
)


def test_a_full_disk_during_a_save_names_the_path_and_keeps_the_last_checkpoint(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a small tmpfs in a private namespace")
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    # Sized to hold one checkpoint of this model (about 4 MB with optimizer state) but not two.
    script = _FULL_DISK_SCRIPT.format(
        size="6000k", mnt=mnt, out=out, bin=BIN, python=sys.executable, args=" ".join(_args(tmp_path))
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    run = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    if run.returncode == 77 or "Operation not permitted" in run.stderr:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {run.stderr.strip()}")
    stderr = (out / "stderr").read_text()
    assert (out / "rc").read_text().strip() == "1", stderr
    assert f"no space left on {mnt}/ckpt/iter_0000002.tmp" in stderr and "Traceback" not in stderr, stderr
    assert (out / "listing").read_text().split() == ["iter_0000001", "latest"]  # the failed save cleaned up
    step, total = (out / "load").read_text().split()
    assert step == "1" and float(total) > 0
    assert list_checkpoints(tmp_path) == []
