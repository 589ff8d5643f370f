"""Metrics logging (console, metrics.jsonl, TensorBoard) and the throughput/MFU meter."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from megalith.training.metrics import MetricsLogger, ThroughputMeter, peak_tflops


def test_jsonl_console_and_tensorboard(tmp_path):
    out = io.StringIO()
    logger = MetricsLogger(tmp_path, total_steps=20, stream=out, progress_bar="off")
    logger.log(10, {"loss": torch.tensor(2.5), "lr": 1e-3, "grad_norm": 0.75, "tokens_per_s": 1234.0, "mfu": 0.42})
    logger.log_eval(10, 2.0)
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == {"step": 10, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.75, "tokens_per_s": 1234.0, "mfu": 0.42}
    assert records[1]["type"] == "eval" and records[1]["eval_ppl"] == pytest.approx(math.exp(2.0))
    text = out.getvalue()
    assert "step 10/20 | loss 2.5000 | lr 1.000e-03 | grad norm 0.750 | 1,234 tok/s | MFU 42.0%" in text
    assert "perplexity 7.389" in text

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == [2.5]
    assert acc.Scalars("eval/eval_loss")[0].step == 10


def test_progress_bar_and_disabled_rank(tmp_path):
    out = io.StringIO()
    logger = MetricsLogger(tmp_path / "a", total_steps=4, stream=out, progress_bar="on", tensorboard=False)
    logger.log(2, {"loss": 1.0})
    logger.close()
    assert "[############            ]  50% step 2/4" in out.getvalue()
    quiet = MetricsLogger(tmp_path / "b", total_steps=4, enabled=False)
    quiet.log(1, {"loss": 1.0})
    quiet.close()
    assert not (tmp_path / "b").exists()


def test_throughput_meter_and_peak_table():
    meter = ThroughputMeter(flops_per_token=6e9, num_devices=2, peak_tflops_per_device=100.0)
    meter._start = 0.0
    meter.add_tokens(5000)
    meter.add_tokens(5000)
    rates = meter.measure(now=2.0)
    assert rates["tokens_per_s"] == pytest.approx(5000.0)
    assert rates["tflops_per_device"] == pytest.approx(5000 * 6e9 / 2 / 1e12)
    assert rates["mfu"] == pytest.approx(rates["tflops_per_device"] / 100.0)
    assert ThroughputMeter(1.0, 1, None).measure()["mfu"] is None
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "fp8") == 1513.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp16") == 312.0
    assert peak_tflops("NVIDIA H200", "fp8") == 1979.0
    assert peak_tflops("NVIDIA B200") == 2250.0
    assert peak_tflops("Some CPU") is None


def test_wandb_requested_but_missing(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(RuntimeError, match="wandb_project is set but wandb is not installed"):
        MetricsLogger(tmp_path, total_steps=1, tensorboard=False, wandb_project="p")
