"""fp8 training with megalith-train: 200 steps of each recipe against bf16, exact resume of delayed scaling
(after a crash, and after kill -9), the checkpointed scaling state, and the fp8 metrics."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megalith.core.checkpoint import read_full_tensors, read_tensor_metadata
from megalith.core.fp8 import FP8_PREFIX
from megalith.training.config_tree import load_config
from megalith.training.run_config import RunConfig
from megalith.training.trainer import Trainer
from tests.harness import run_distributed
from tests.training.loop_common import KilledTrainer, layout, make_config, train_losses

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# ---- 200 steps against bf16 ----------------------------------------------------------------------------------

# The tiny GPT (2 layers, hidden 64) on the learnable synthetic sequences, 8 x 32 tokens per step.
LONG = [
    "data.seq_len=32", "training.global_batch_size=8", "training.micro_batch_size=8", "training.train_iters=200",
    "logging.log_interval=50", "logging.tensorboard=false", "optimizer.lr=3e-3", "schedule.warmup_steps=20",
    "precision.dtype=bf16",
]  # fmt: skip
# e4m3 keeps 3 mantissa bits, bf16 7: a unit roundoff 2**-4 against 2**-8. The tolerance for fp8 against bf16 is
# that ratio times the gap bf16 itself opens against fp32 in the same run (the effect of rounding noise 16 times
# smaller on this very training curve), on the largest per-step difference of the loss.
ROUNDOFF_RATIO = 2.0**-4 / 2.0**-8


def _curve(tmp: Path, name: str, *extra: str) -> tuple[list[float], list[dict]]:
    cfg = load_config(RunConfig, None, [*LONG, f"logging.run_dir={tmp / name}", *extra])
    trainer = Trainer(cfg, stream=io.StringIO())
    trainer.fit()
    trainer.close()
    records = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    return [h["loss"] for h in trainer.history if "loss" in h], records


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baselines")
    bf16, _ = _curve(tmp, "bf16")
    fp32, _ = _curve(tmp, "fp32", "precision.dtype=fp32")
    return bf16, max(abs(a - b) for a, b in zip(bf16, fp32, strict=True))


@pytest.mark.parametrize(
    "overrides",
    [["fp8.recipe=tensorwise"], ["fp8.recipe=delayed"], ["fp8.recipe=rowwise"],
     ["fp8.recipe=tensorwise", "fp8.format=e4m3"]],
    ids=["tensorwise", "delayed", "rowwise", "tensorwise-e4m3"],
)  # fmt: skip
def test_200_steps_of_fp8_stay_close_to_bf16(tmp_path, baselines, overrides):
    bf16, bf16_vs_fp32 = baselines
    losses, records = _curve(tmp_path, "fp8", *overrides)
    gaps = [abs(a - b) for a, b in zip(losses, bf16, strict=True)]
    tail = sum(losses[-50:]) / 50 - sum(bf16[-50:]) / 50
    print(f"\n{' '.join(overrides)}: largest per-step loss gap to bf16 {max(gaps):.5f} (tolerance "
          f"{ROUNDOFF_RATIO * bf16_vs_fp32:.5f} = 16 x bf16-vs-fp32 {bf16_vs_fp32:.5f}); mean over the last 50 "
          f"steps {tail:+.5f} on a loss of {sum(bf16[-50:]) / 50:.4f}")  # fmt: skip
    assert all(math.isfinite(x) for x in losses)
    assert max(gaps) > 0, "fp8 must actually change the computation"
    assert max(gaps) <= ROUNDOFF_RATIO * bf16_vs_fp32
    assert sum(losses[-50:]) / 50 < 0.5 * losses[0], "the model learns"
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [50, 100, 150, 200]
    for record in logged:
        for key in ("fp8_saturated", "fp8_underflow", "fp8_grad_saturated", "fp8_weight_underflow"):
            assert 0.0 <= record[key] < 0.01, (key, record)


# ---- exact resume ----------------------------------------------------------------------------------------------

DELAYED = ["fp8.recipe=delayed", "fp8.amax_history_len=3", "precision.dtype=bf16"]


def _histories(trainer) -> list[torch.Tensor]:
    return [s.history.clone() for s in trainer.fp8.states] + [s.scale.clone() for s in trainer.fp8.states]


def _crash_and_resume(rank, world_size, tmp, overrides):
    full, full_trainer = train_losses(make_config(f"{tmp}/full", *overrides))
    ck = f"{tmp}/crash/ck"
    crashed_cfg = make_config(f"{tmp}/crash", *overrides, f"checkpoint.save={ck}", "checkpoint.save_interval=3")
    crashed, _ = train_losses(crashed_cfg, KilledTrainer, kill_at=4)
    cfg = make_config(f"{tmp}/crash", *overrides, f"checkpoint.save={ck}", f"checkpoint.load={ck}")
    resumed, trainer = train_losses(cfg)
    same_state = all(torch.equal(a, b) for a, b in zip(_histories(full_trainer), _histories(trainer), strict=True))
    return full, crashed, resumed, same_state


@pytest.mark.parametrize(
    ("world_size", "overrides"),
    [(1, DELAYED), (2, [*DELAYED, *layout(2, 1, "parallel.sequence_parallel=true")]),
     (2, [*DELAYED, *layout(1, 1, "ddp.use_distributed_optimizer=true")])],
    ids=["alone", "tp2-sp", "dp2-zero1"],
)  # fmt: skip
def test_delayed_scaling_resumes_exactly_after_a_crash(tmp_path, world_size, overrides):
    for full, crashed, resumed, same_state in run_distributed(_crash_and_resume, world_size, str(tmp_path), overrides):
        assert crashed == full[:4]
        assert resumed == full[3:], "steps 4..6 again, bit for bit"
        assert same_state, "the amax histories and scales end where the uninterrupted run's do"
    ckpt = tmp_path / "crash/ck/iter_0000006"
    names = read_tensor_metadata(ckpt)
    fp8 = sorted(n for n in names if n.startswith(FP8_PREFIX))
    assert "fp8/layers.0.attn.qkv/amax_history" in fp8 and "fp8/layers.3.mlp.fc2/scale" in fp8
    assert names["fp8/layers.0.attn.qkv/amax_history"].shape == (3, 3)
    # The state is global (the same on every rank): one process loads it unchanged, whatever layout saved it.
    saved = read_full_tensors(ckpt, fp8)
    alone = Trainer(make_config(f"{tmp_path}/alone", *DELAYED, f"checkpoint.load={ckpt}"), stream=io.StringIO())
    loaded = {k: v.tensor for k, v in alone.fp8.sharded_state().items()}
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert alone.fp8.states[0].initialized
    alone.close()


def test_a_bf16_checkpoint_resumes_in_fp8_and_the_history_length_must_match(tmp_path):
    ck = f"{tmp_path}/ck"
    train_losses(make_config(str(tmp_path), "training.train_iters=2", f"checkpoint.save={ck}"))
    stream = io.StringIO()
    trainer = Trainer(make_config(str(tmp_path), *DELAYED, "training.train_iters=4", f"checkpoint.load={ck}"),
                      stream=stream)  # fmt: skip
    assert trainer.step == 2 and "scaling starts afresh" in stream.getvalue()
    trainer.fit()
    trainer.close()
    saved = f"{tmp_path}/ck2"
    train_losses(make_config(str(tmp_path), *DELAYED, "training.train_iters=2", f"checkpoint.save={saved}"))
    other = make_config(str(tmp_path), *DELAYED, "fp8.amax_history_len=5", f"checkpoint.load={saved}")
    with pytest.raises(ValueError, match=r"keeps amax histories of 3 steps but fp8\.amax_history_len is 5; "
                                         r"resume with fp8\.amax_history_len=3"):  # fmt: skip
        Trainer(other, stream=io.StringIO())


# ---- kill -9 ---------------------------------------------------------------------------------------------------


def _run_args(run_dir: Path, *extra: str) -> list[str]:
    return [
        str(BIN / "megalith-train"), "--config", str(ROOT / "examples/configs/tiny.yaml"),
        "model.num_layers=2", "data.seq_len=32", "training.micro_batch_size=2", "training.global_batch_size=4",
        "training.eval_interval=null", "logging.log_interval=1", "logging.tensorboard=false",
        "schedule.warmup_steps=2", "training.train_iters=40", "checkpoint.save_interval=5", *DELAYED,
        f"logging.run_dir={run_dir}", f"--save={run_dir}/ck", *extra,
    ]  # fmt: skip


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def test_kill_9_with_delayed_scaling_then_resume_repeats_the_loss_curve(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = subprocess.run(_run_args(tmp_path / "ref"), env=env, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    assert "fp8 delayed hybrid (native)" in reference.stdout
    run = tmp_path / "run"
    proc = subprocess.Popen(_run_args(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 12:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 12 <= max(_losses(run)) < 40
    resumed = subprocess.run(_run_args(run, f"--load={run}/ck"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert _losses(run) == _losses(tmp_path / "ref")
