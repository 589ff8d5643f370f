"""Training metrics: console lines (a progress bar on a terminal), metrics.jsonl, TensorBoard, W&B, and MFU."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

__all__ = ["PEAK_TFLOPS", "MetricsLogger", "ThroughputMeter", "peak_tflops"]

# Dense peak TFLOP/s per device (no sparsity), SXM parts unless named otherwise.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp8": 1513.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0},
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0},
}


def peak_tflops(device_name: str, dtype: str = "bf16") -> float | None:
    """Peak dense TFLOP/s of a device named like torch.cuda.get_device_name() (None when unknown)."""
    name = device_name.upper()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if all(part.upper() in name for part in key.split()):
            return PEAK_TFLOPS[key].get(dtype)
    return None


class ThroughputMeter:
    """Tokens/s, TFLOP/s per device and MFU over the interval since the last `measure()`.

    Args:
        flops_per_token: analytic training FLOPs (forward + backward) per token of the whole model.
        num_devices: devices the work is spread over (the world size).
        peak_tflops_per_device: the device's peak; None leaves `mfu` out.
    """

    def __init__(self, flops_per_token: float, num_devices: int, peak_tflops_per_device: float | None) -> None:
        self.flops_per_token = flops_per_token
        self.num_devices = num_devices
        self.peak = peak_tflops_per_device
        self._tokens = 0
        self._start = time.perf_counter()

    def add_tokens(self, tokens: int) -> None:
        self._tokens += tokens

    def measure(self, now: float | None = None) -> dict[str, float | None]:
        """Rates since the previous call, then starts a new interval."""
        now = time.perf_counter() if now is None else now
        seconds = max(now - self._start, 1e-9)
        tokens_per_s = self._tokens / seconds
        tflops = tokens_per_s * self.flops_per_token / self.num_devices / 1e12
        self._tokens, self._start = 0, now
        return {
            "tokens_per_s": tokens_per_s,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak if self.peak else None,
        }


class MetricsLogger:
    """Writes each logged step to the console, RUN_DIR/metrics.jsonl, TensorBoard and W&B.

    Only the process with `enabled=True` writes anything (e.g. global rank 0, or the last pipeline stage's
    first rank, which holds the loss).

    Args:
        run_dir: the run directory.
        total_steps: the run length (for step/total and the progress bar).
        enabled: whether this process logs.
        tensorboard: write TensorBoard event files under RUN_DIR/tensorboard.
        wandb_project: log to W&B too (raises when wandb is not installed).
        progress_bar: "auto" (when the console is a terminal), "on" or "off".
        stream: the console stream.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        total_steps: int,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        wandb_entity: str | None = None,
        wandb_name: str | None = None,
        wandb_config: dict[str, Any] | None = None,
        progress_bar: str = "auto",
        stream: IO[str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        self.bar = progress_bar == "on" or (progress_bar == "auto" and self.stream.isatty())
        self._jsonl = self._tb = self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError(
                    "logging.wandb_project is set but wandb is not installed (pip install 'megalith-training[wandb]')"
                ) from None
            self._wandb = wandb.init(
                project=wandb_project, entity=wandb_entity, name=wandb_name, config=wandb_config, dir=str(self.run_dir)
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Logs training metrics of `step` (e.g. loss, lr, grad_norm, tokens_per_s, mfu, skipped_steps)."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._write(record, prefix="train")
        self._console(self._train_line(step, record))

    def log_eval(self, step: int, loss: float, extra: dict[str, Any] | None = None) -> None:
        """Logs an evaluation: loss and perplexity."""
        if not self.enabled:
            return
        ppl = math.exp(loss) if loss < 700 else math.inf
        record = {"step": step, "type": "eval", "eval_loss": float(loss), "eval_ppl": ppl, **(extra or {})}
        self._write(record, prefix="eval")
        self._console(f"eval at step {step}: loss {loss:.4f} | perplexity {ppl:.3f}", newline=True)

    def message(self, text: str) -> None:
        """A free-form console line (checkpoint saved, stopping on a signal...)."""
        if self.enabled:
            self._console(text, newline=True)

    def _write(self, record: dict[str, Any], prefix: str) -> None:
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self._jsonl.flush()
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k not in ("step", "type") and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"{prefix}/{key}", value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=step)

    def _train_line(self, step: int, r: dict[str, Any]) -> str:
        parts = [f"step {step}/{self.total_steps}"]
        fmt = {
            "loss": "loss {:.4f}",
            "moe_aux_loss": "aux {:.4f}",
            "moe_z_loss": "z-loss {:.4f}",
            "moe_load_cv_max": "load cv {:.2f}",
            "moe_dropped_fraction": "dropped {:.2%}",
            "lr": "lr {:.3e}",
            "grad_norm": "grad norm {:.3f}",
            "tokens_per_s": "{:,.0f} tok/s",
            "tflops_per_device": "{:.3g} TFLOP/s/dev",
            "mfu": "MFU {:.1%}",
            "mem_gib": "mem {:.2f} GiB",
            "mem_reserved_gib": "reserved {:.2f} GiB",
            "skipped_steps": "skipped {}",
        }
        for key, pattern in fmt.items():
            if r.get(key) is not None:
                parts.append(pattern.format(r[key]))
        line = " | ".join(parts)
        if self.bar:
            width, done = 24, min(1.0, step / max(1, self.total_steps))
            line = f"[{'#' * int(width * done):<{width}}] {done:4.0%} " + line
        return line

    def _console(self, text: str, newline: bool = False) -> None:
        if self.bar and not newline:
            self.stream.write("\r\x1b[2K" + text)
        else:
            self.stream.write(("\n" if self.bar else "") + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars become Python numbers for JSON."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
