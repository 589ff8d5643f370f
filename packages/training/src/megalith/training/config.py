"""The training loop's own config sections (schedule, training, checkpoint, logging) and the command line.

`megalith.training.run_config.RunConfig` composes them with the components' configs (model, runtime, loss,
parallel, precision, ddp, optimizer from megalith.core; data). Every field has a help text (shown by --help)
and each section validates itself in `__post_init__`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from typing import Literal, TypeVar

from megalith.core.fields import option
from megalith.training.config_tree import ConfigError, format_config_help, load_config

__all__ = [
    "CheckpointConfig",
    "CliArgs",
    "LoggingConfig",
    "ScheduleConfig",
    "TrainingConfig",
    "parse_cli",
]

T = TypeVar("T")
DecayStyle = Literal["constant", "linear", "cosine", "wsd", "inverse-sqrt"]


def check(ok: bool, message: str) -> None:
    """Raises ValueError(message) unless `ok` (the configs' field checks)."""
    if not ok:
        raise ValueError(message)


@dataclasses.dataclass(kw_only=True, frozen=True)
class ScheduleConfig:
    """Learning-rate warmup and decay, and the weight-decay schedule (steps are optimizer steps)."""

    warmup_steps: int = option(0, help="Linear warmup steps from warmup_init_lr to optimizer.lr.")
    warmup_fraction: float | None = option(
        None, help="Warmup as a fraction of the total steps (overrides warmup_steps)."
    )
    warmup_init_lr: float = option(0.0, help="Learning rate at the start of warmup.")
    decay_style: DecayStyle = option(
        "cosine", help="Decay after warmup: constant, linear, cosine, wsd or inverse-sqrt."
    )
    decay_steps: int | None = option(None, help="Step at which decay reaches min_lr; None: the total number of steps.")
    min_lr: float = option(0.0, help="Floor of the learning rate.")
    wsd_decay_fraction: float = option(0.1, help="WSD: fraction of decay_steps spent in the final decay.")
    wsd_decay_steps: int | None = option(None, help="WSD: steps of the final decay (overrides wsd_decay_fraction).")
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus-sqrt"] = option(
        "linear", help="WSD: shape of the final decay."
    )
    weight_decay_start: float | None = option(None, help="Weight decay at step 0; None: optimizer.weight_decay.")
    weight_decay_end: float | None = option(None, help="Weight decay at decay_steps; None: optimizer.weight_decay.")
    weight_decay_style: Literal["constant", "linear", "cosine"] = option(
        "constant", help="How weight decay moves from weight_decay_start to weight_decay_end."
    )

    def __post_init__(self) -> None:
        check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        check(
            self.warmup_fraction is None or 0 <= self.warmup_fraction < 1,
            f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}",
        )
        check(self.warmup_init_lr >= 0, f"warmup_init_lr must be >= 0, got {self.warmup_init_lr}")
        check(self.decay_steps is None or self.decay_steps > 0, f"decay_steps must be > 0, got {self.decay_steps}")
        check(self.min_lr >= 0, f"min_lr must be >= 0, got {self.min_lr}")
        check(0 < self.wsd_decay_fraction <= 1, f"wsd_decay_fraction must be in (0, 1], got {self.wsd_decay_fraction}")
        check(
            self.wsd_decay_steps is None or self.wsd_decay_steps > 0,
            f"wsd_decay_steps must be > 0, got {self.wsd_decay_steps}",
        )
        for name in ("weight_decay_start", "weight_decay_end"):
            value = getattr(self, name)
            check(value is None or value >= 0, f"{name} must be >= 0, got {value}")


@dataclasses.dataclass(kw_only=True, frozen=True)
class TrainingConfig:
    """Batch sizes, run length, evaluation, seed and failure policies."""

    micro_batch_size: int = option(1, help="Sequences per micro-batch per data-parallel rank.")
    global_batch_size: int = option(8, help="Sequences per optimizer step over all data-parallel ranks.")
    train_iters: int | None = option(
        100, help="Optimizer steps to train for (set train_samples instead to count samples)."
    )
    train_samples: int | None = option(
        None, help="Sequences to train on; the steps are ceil(samples / global_batch_size)."
    )
    eval_interval: int | None = option(None, help="Evaluate every this many steps; None: never.")
    eval_iters: int = option(10, help="Batches per evaluation.")
    seed: int = option(1234, help="Seed of weights, data order and dropout.")
    exit_duration_min: float | None = option(None, help="Save and exit after this many minutes of wall clock.")
    nonfinite_policy: Literal["skip", "abort"] = option(
        "skip", help="On a NaN/Inf loss: skip the step (counted) or stop at once."
    )
    max_consecutive_nonfinite: int = option(5, help="Stop with an error after this many non-finite losses in a row.")

    def __post_init__(self) -> None:
        check(self.micro_batch_size >= 1, f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        check(self.global_batch_size >= 1, f"global_batch_size must be >= 1, got {self.global_batch_size}")
        check(
            self.global_batch_size % self.micro_batch_size == 0,
            f"global_batch_size ({self.global_batch_size}) is not a multiple of micro_batch_size "
            f"({self.micro_batch_size})",
        )
        check(
            (self.train_iters is None) != (self.train_samples is None),
            f"set exactly one of train_iters ({self.train_iters}) and train_samples ({self.train_samples})",
        )
        check(self.train_iters is None or self.train_iters >= 1, f"train_iters must be >= 1, got {self.train_iters}")
        check(
            self.train_samples is None or self.train_samples >= 1,
            f"train_samples must be >= 1, got {self.train_samples}",
        )
        check(
            self.eval_interval is None or self.eval_interval >= 1,
            f"eval_interval must be >= 1, got {self.eval_interval}",
        )
        check(self.eval_iters >= 1, f"eval_iters must be >= 1, got {self.eval_iters}")
        check(
            self.exit_duration_min is None or self.exit_duration_min > 0,
            f"exit_duration_min must be > 0, got {self.exit_duration_min}",
        )
        check(
            self.max_consecutive_nonfinite >= 1,
            f"max_consecutive_nonfinite must be >= 1, got {self.max_consecutive_nonfinite}",
        )

    @property
    def total_steps(self) -> int:
        if self.train_iters is not None:
            return self.train_iters
        return math.ceil(self.train_samples / self.global_batch_size)

    def grad_accumulation(self, dp: int) -> int:
        """Micro-batches per step on each data-parallel rank; raises when the batch sizes do not divide."""
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"training.global_batch_size ({self.global_batch_size}) is not divisible by "
                f"micro_batch_size * dp ({self.micro_batch_size} * {dp})"
            )
        return self.global_batch_size // per_step


@dataclasses.dataclass(kw_only=True, frozen=True)
class CheckpointConfig:
    """Where and how often checkpoints are written, and what a resume loads."""

    save: str | None = option(None, help="Checkpoint root directory to save into (ROOT/iter_*/, ROOT/latest).")
    load: str | None = option(
        None, help="Checkpoint root or iter_* directory to resume from (its latest complete one)."
    )
    save_interval: int | None = option(None, help="Save every this many steps (and at the end); None: only at the end.")
    keep_last: int | None = option(3, help="Keep this many newest checkpoints; None: keep all.")
    async_save: bool = option(False, help="Copy the state to CPU and write it in a background thread.")
    save_optimizer: bool = option(True, help="Include optimizer state.")
    load_optimizer: bool = option(True, help="Load optimizer state when the checkpoint has it.")
    load_rng: bool = option(True, help="Restore RNG states (when the world size matches the saving one).")
    finetune: bool = option(False, help="Load weights only and start from step 0.")
    verify: Literal["checksum", "size"] = option(
        "checksum", help="What loading checks of every checkpoint file: size and CRC32, or the size only (faster)."
    )
    force: bool = option(
        False, help="Save into checkpoint.save even when it holds another run's checkpoints (`latest` moves)."
    )

    def __post_init__(self) -> None:
        check(
            self.save_interval is None or self.save_interval >= 1,
            f"save_interval must be >= 1, got {self.save_interval}",
        )
        check(self.keep_last is None or self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}")


@dataclasses.dataclass(kw_only=True, frozen=True)
class LoggingConfig:
    """Run directory, console, metrics.jsonl, TensorBoard and W&B."""

    run_dir: str = option("runs/default", help="Run directory: config.yaml, metrics.jsonl, tensorboard/.")
    log_interval: int = option(10, help="Log every this many steps.")
    tensorboard: bool = option(True, help="Write TensorBoard event files under RUN_DIR/tensorboard.")
    wandb_project: str | None = option(None, help="Log to this Weights & Biases project (needs wandb installed).")
    wandb_entity: str | None = option(None, help="W&B entity (team or user).")
    wandb_name: str | None = option(None, help="W&B run name.")
    progress_bar: Literal["auto", "on", "off"] = option("auto", help="Progress bar on the console (auto: on a TTY).")
    peak_tflops: float | None = option(None, help="Peak TFLOP/s per device for MFU; None: from the device table.")

    def __post_init__(self) -> None:
        check(self.log_interval >= 1, f"log_interval must be >= 1, got {self.log_interval}")
        check(self.peak_tflops is None or self.peak_tflops > 0, f"peak_tflops must be > 0, got {self.peak_tflops}")


@dataclasses.dataclass(frozen=True)
class CliArgs:
    """What `parse_cli` found: the resolved config and the command-line switches."""

    config: object
    config_file: str | None
    print_config: bool
    overrides: tuple[str, ...]


def parse_cli(
    cls: type[T], argv: Sequence[str] | None = None, *, prog: str = "megalith-train", description: str = ""
) -> CliArgs:
    """Parses `[--config FILE] [--print-config] [section.field=value | --section.field value ...]`.

    `--help` prints every field of `cls` with its type, default and help text, then exits.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="configuration fields (override with section.field=value):\n" + format_config_help(cls),
    )
    parser.add_argument("--config", metavar="FILE", help="YAML, TOML or JSON file with the configuration tree")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="overrides, applied in order")
    args, rest = parser.parse_known_args(argv)
    overrides = list(args.overrides)
    i = 0
    while i < len(rest):  # --section.field=value and --section.field value forms
        item = rest[i]
        if not item.startswith("--") or "." not in item.split("=", 1)[0]:
            parser.error(f"unrecognized argument {item!r}")
        if "=" in item:
            overrides.append(item[2:])
            i += 1
        elif i + 1 < len(rest):
            overrides.append(f"{item[2:]}={rest[i + 1]}")
            i += 2
        else:
            parser.error(f"{item} needs a value")
    config = load_config(cls, args.config, overrides)
    return CliArgs(config, args.config, args.print_config, tuple(overrides))
