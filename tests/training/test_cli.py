"""megalith-train as users run it: --help, --print-config, config errors, example configs, torchrun, kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megalith.training.cli import main
from megalith.training.config_tree import ConfigError, load_config
from megalith.training.run_config import RunConfig

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))


def test_help_documents_every_section(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("model.preset", "model.num_layers", "parallel.tp", "ddp.use_distributed_optimizer",
                 "data.blend", "data.seq_len", "optimizer.lr", "checkpoint.load", "--load DIR", "fp8.recipe",
                 "fp8.amax_history_len"):  # fmt: skip
        assert name in out, name


def test_print_config_resolves_preset_and_overrides(capsys):
    assert main(["--print-config", "model.preset=llama3-1b", "model.num_layers=4", "parallel.tp=2", "--load", "x"]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["model"]["preset"] == "llama3-1b" and tree["model"]["num_layers"] == 4
    assert tree["parallel"]["tp"] == 2 and tree["checkpoint"]["load"] == "x"
    cfg = load_config(RunConfig, None, ["model.preset=llama3-1b", "model.num_layers=4"])
    assert cfg.model.hidden_size == 2048 and cfg.model.num_layers == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.preset=llama9"], "model: preset 'llama9' is not one of"),
        (["model.num_layer=4"], "did you mean 'model.num_layers'"),
        (["parallel.tp=3"], "num_attention_heads (4) is not divisible by tp (3)"),
        (["parallel.pp=3"], "model.num_layers (2) is not divisible by parallel.pp * virtual_stages (3)"),
        (["parallel.virtual_stages=2"], "virtual_stages (2) > 1 needs pp > 1"),
        (
            ["precision.dtype=fp8"],
            "precision.dtype=fp8 (in the overrides): fp8 is not a parameter dtype: set fp8.recipe",
        ),
        (["parallel.precision=fp8"], "parallel.precision=fp8 (in the overrides): fp8 is not a parameter dtype"),
        (["fp8.recipe=delayed", "precision.dtype=fp16"], "cannot be combined with precision.dtype=fp16"),
        (["fp8.recipe=mxfp8"], "fp8: Fp8Config.recipe 'mxfp8' needs backend 'te'"),
        (
            ["parallel.precision=bf16"],
            "config key 'parallel.precision' (in the overrides) was renamed: write 'precision.dtype'",
        ),
        (["model.kernels=fused"], "config key 'model.kernels' (in the overrides) was renamed: write 'runtime.kernels'"),
        (["data.seq_len=4096"], "data.seq_len (4096) exceeds model.max_seq_len (128)"),
        (["data.synthetic=false"], "no training data"),
        (["data.blend=a", "data.train_blend=b"], "either blend"),
        (["model.preset=null", "model.hidden_size=64"], "these fields must be set: vocab_size"),
        (["training.global_batch_size=6", "training.micro_batch_size=4"], "not a multiple of micro_batch_size"),
        (["parallel.fsdp=true"], "'parallel.fsdp' (in the overrides) was removed"),
        (["parallel.cp=3"], "data.seq_len (128) is not divisible by 2 * parallel.cp = 6"),
    ],
)
def test_config_errors_name_the_field_and_value(overrides, message, capsys):
    with pytest.raises(ConfigError, match=None) as exc:
        load_config(RunConfig, None, overrides)
    assert message in str(exc.value)
    assert main(["--print-config", *overrides]) == 2
    assert message in capsys.readouterr().err


def test_world_size_must_fit_the_layout():
    cfg = load_config(RunConfig, None, ["parallel.tp=2", "parallel.dp=2"])
    assert cfg.parallel.data_parallel(4) == 2
    with pytest.raises(ValueError, match=r"parallel.dp \(2\) does not match world size 8"):
        cfg.parallel.data_parallel(8)
    with pytest.raises(ValueError, match=r"world size 3 is not divisible by tp \(2\)"):
        cfg.parallel.data_parallel(3)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_configs_resolve(path):
    cfg = load_config(RunConfig, path)
    model = cfg.model
    assert cfg.data.seq_len <= model.max_seq_len
    assert model.num_layers % (cfg.parallel.pp * cfg.parallel.virtual_stages) == 0


def _run_args(run_dir: Path, *extra: str) -> list[str]:
    return [
        str(BIN / "megalith-train"),
        "--config", str(ROOT / "examples/configs/tiny.yaml"),
        "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "data.seq_len=32",
        "training.micro_batch_size=2", "training.global_batch_size=4", "training.eval_interval=null",
        "logging.log_interval=1", "logging.tensorboard=false", "schedule.warmup_steps=2",
        f"logging.run_dir={run_dir}", f"--save={run_dir}/ck",
        *extra,
    ]  # fmt: skip


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]  # a resumed run re-logs steps after its checkpoint
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_kill_9_then_resume_continues_the_same_loss_curve(tmp_path):
    steps = ["training.train_iters=120", "checkpoint.save_interval=10"]
    reference = subprocess.run(_run_args(tmp_path / "ref", *steps), env=_env(), capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    written = load_config(RunConfig, tmp_path / "ref/config.yaml")  # the resolved tree reloads as it ran
    assert written.training.train_iters == 120 and written.checkpoint.save == f"{tmp_path / 'ref'}/ck"
    run = tmp_path / "run"
    proc = subprocess.Popen(_run_args(run, *steps), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 25:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(run))
    assert 25 <= killed_at < 120
    resumed = subprocess.run(_run_args(run, *steps, f"--load={run}/ck"), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert _losses(run) == _losses(tmp_path / "ref")


def test_torchrun_two_ranks_and_sigterm_exit_zero_with_a_checkpoint(tmp_path):
    args = _run_args(tmp_path, "parallel.pp=2", "training.train_iters=3", "data.num_workers=1")
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", *args]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(_losses(tmp_path)) == [1, 2, 3]
    assert (tmp_path / "ck/iter_0000003/megalith.json").is_file()
    # SIGTERM: the step finishes, a checkpoint is written, the exit code is 0.
    run = tmp_path / "term"
    proc = subprocess.Popen(
        _run_args(run, "training.train_iters=100000"), env=_env(), stdout=subprocess.PIPE, text=True
    )
    while proc.poll() is None and not ((run / "metrics.jsonl").is_file() and _losses(run)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert "stopping at step" in out and "signal SIGTERM" in out
    saved = json.loads((run / "ck" / (run / "ck/latest").read_text().strip() / "megalith.json").read_text())
    assert saved["step"] >= 1 and saved["has_optimizer"]
