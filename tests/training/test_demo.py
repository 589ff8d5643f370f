"""The README's first command, in its quick form: corpus, tokenizer, preprocessing, training, a checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from megalith.core.checkpoint import ModelCheckpointReader

ROOT = Path(__file__).resolve().parents[2]


def test_quick_demo_trains_with_falling_loss_and_saves(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, str(ROOT / "examples/demo.py"), "--quick", "--steps", "30", "--out", str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "training loss fell from", "TensorBoard"):
        assert step in out, step
    records = [json.loads(line) for line in (tmp_path / "train/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30 and losses[-1] < losses[0] - 0.5
    assert any("eval_loss" in r for r in records)
    assert list((tmp_path / "train/tensorboard").iterdir())
    reader = ModelCheckpointReader(tmp_path / "train/checkpoints")
    assert reader.step == 30 and reader.tokenizer_dir is not None
    assert reader.model_config["vocab_size"] == 1024 and reader.model_config["family"] == "llama"
    assert "--- prompt 'def '" in out and "--- prompt 'import os\\n'" in out
