"""`megalith-train`: parse the configuration, train, exit 0 on completion or a clean stop (signal, time limit)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from megalith.training.config import parse_cli
from megalith.training.config_tree import ConfigError, format_config
from megalith.training.run_config import RunConfig

__all__ = ["main"]

DESCRIPTION = """\
Train a GPT-2 or Llama style model with tensor, pipeline and data parallelism.

  megalith-train --config examples/configs/tiny.yaml                       one process (CPU or one GPU)
  torchrun --nproc-per-node 8 -m megalith.training.cli --config FILE       or: torchrun ... $(which megalith-train)
  megalith-train --config FILE --load runs/x/checkpoints                   resume from the latest checkpoint
  megalith-train --config FILE model.num_layers=4 parallel.tp=2 --print-config

--load DIR, --save DIR and --run-dir DIR are short for checkpoint.load=DIR, checkpoint.save=DIR and
logging.run_dir=DIR, and --force for checkpoint.force=true (save into a folder holding another run's
checkpoints). Exit codes: 0 finished or stopped cleanly (SIGTERM/SIGINT/SIGUSR1, time limit; a checkpoint is
saved first when checkpoint.save is set), 2 configuration error, 1 anything else (out of GPU memory: one line
naming the layout and the settings that lower memory).
"""

_SHORTCUTS = {"--load": "checkpoint.load", "--save": "checkpoint.save", "--run-dir": "logging.run_dir"}


def _expand_shortcuts(argv: Sequence[str]) -> list[str]:
    out, i = [], 0
    argv = list(argv)
    while i < len(argv):
        item = argv[i]
        flag, eq, value = item.partition("=")
        if item == "--force":
            out.append("checkpoint.force=true")
        elif flag in _SHORTCUTS:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{flag} needs a directory")
                value, i = argv[i + 1], i + 1
            out.append(f"{_SHORTCUTS[flag]}={value}")
        else:
            out.append(item)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_cli(RunConfig, _expand_shortcuts(argv), prog="megalith-train", description=DESCRIPTION)
    except ConfigError as exc:
        print(f"megalith-train: error: {exc}", file=sys.stderr)
        return 2
    cfg = args.config
    if args.print_config:
        print(format_config(cfg), end="")
        return 0
    from megalith.core.world import destroy_distributed
    from megalith.training.memory import TrainingOutOfMemoryError
    from megalith.training.resilience import NonFiniteLossError
    from megalith.training.trainer import Trainer

    try:
        trainer = Trainer(cfg)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"megalith-train: error: {exc}", file=sys.stderr)
        destroy_distributed()
        return 2
    except TrainingOutOfMemoryError as exc:
        print(f"megalith-train: error: {exc}", file=sys.stderr)
        destroy_distributed()
        return 1
    try:
        reason = trainer.fit()
        trainer.logger.message(_summary(trainer, reason))
    except (NonFiniteLossError, TrainingOutOfMemoryError, OSError) as exc:  # OSError: a full or read-only disk
        print(f"megalith-train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        trainer.close()
        destroy_distributed()
    return 0


def _summary(trainer, reason: str) -> str:
    run_dir = trainer.run_dir
    lines = [f"done ({reason}) at step {trainer.step}/{trainer.total_steps}"]
    lines.append(f"metrics: {run_dir / 'metrics.jsonl'}")
    if trainer.cfg.logging.tensorboard:
        lines.append(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    if trainer.cfg.checkpoint.save:
        lines.append(f"checkpoints: {trainer.cfg.checkpoint.save} (resume with --load {trainer.cfg.checkpoint.save})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
