"""Shared helpers of the training-loop tests: a tiny run configuration and trainers driven step by step."""

from __future__ import annotations

import contextlib
import io

from megalith.training.config_tree import load_config
from megalith.training.run_config import RunConfig
from megalith.training.trainer import Trainer

# A 4-layer tiny GPT on synthetic data: 4 micro-batches of 2 sequences per step at dp1.
BASE = [
    "model.num_layers=4",
    "data.seq_len=16",
    "training.global_batch_size=8",
    "training.micro_batch_size=2",
    "training.train_iters=6",
    "training.eval_iters=1",
    "logging.log_interval=1",
    "logging.tensorboard=false",
    "optimizer.lr=1e-2",
    "schedule.warmup_steps=1",
]


def make_config(tmp: str, *overrides: str) -> RunConfig:
    return load_config(RunConfig, None, [*BASE, f"logging.run_dir={tmp}/run", *overrides])


def layout(tp: int = 1, pp: int = 1, *extra: str) -> list[str]:
    return [f"parallel.tp={tp}", f"parallel.pp={pp}", *extra]


class StopAt(Exception):
    """Raised by `KilledTrainer` to abandon a run as a crash would (no save, no cleanup)."""


class KilledTrainer(Trainer):
    """Dies right after step `kill_at` (before any save of that step), like a `kill -9` would."""

    kill_at = 0

    def on_step_end(self, out) -> None:
        if self.step == self.kill_at:
            raise StopAt(self.step)


def train_losses(cfg: RunConfig, trainer_cls=Trainer, **attrs) -> tuple[list[tuple[int, float]], Trainer]:
    """Runs `fit()` and returns ((step, loss) per step, the trainer); a StopAt ends it early."""
    trainer = trainer_cls(cfg, stream=io.StringIO())
    for key, value in attrs.items():
        setattr(trainer, key, value)
    with contextlib.suppress(StopAt):
        trainer.fit()
    trainer.close()
    return [(h["step"], h["loss"]) for h in trainer.history if "loss" in h], trainer


def params_checksum(trainer: Trainer) -> float:
    return float(sum(p.detach().double().abs().sum() for c in trainer.chunks for p in c.parameters()))
