"""The training loop of `megalith-train`: build the parallel model, step it, evaluate, log, checkpoint, stop.

`Trainer(cfg)` sets everything up from a `RunConfig` (joining or creating the process group); `fit()` trains
until the run length, a stop signal or the wall-clock limit, and returns why it stopped. Each piece (one
step, evaluation, logging, saving, loading) is a method, so tests and tools can drive them one by one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from megalith.core import (
    ParallelDims,
    build_loss_fn,
    build_model_chunks,
    count_parameters,
    flops_per_token,
    init_distributed,
)
from megalith.core.checkpoint import read_info, read_tensor_metadata
from megalith.core.checkpoint.storage import probe_writable
from megalith.core.config import PRESETS
from megalith.core.distributed import AdamW, DistributedDataParallel, build_comms
from megalith.core.fp8 import Fp8Training
from megalith.core.moe.stats import MoEStepReport, finish_moe_step
from megalith.core.parallel.random import derive_seed
from megalith.core.pipeline import forward_backward, unwrap
from megalith.core.precision import make_loss_scaler
from megalith.training.checkpointing import CheckpointManager, find_checkpoint, has_optimizer_state
from megalith.training.config_tree import config_to_dict, dump_config
from megalith.training.data import build_datasets, load_tokenizer, micro_batches, samples_needed
from megalith.training.memory import (
    TrainingOutOfMemoryError,
    format_memory_per_rank,
    memory_metrics,
    out_of_memory_message,
    peak_memory_per_rank,
)
from megalith.training.metrics import MetricsLogger, ThroughputMeter, peak_tflops
from megalith.training.resilience import ExitMonitor, NonFiniteTracker
from megalith.training.run_config import RunConfig
from megalith.training.schedules import ParamScheduler
from megalith.training.train_state import (
    AdamCounters,
    check_model_config,
    masters_from_params,
    model_state,
    optimizer_state,
)

__all__ = ["StepOutput", "Trainer", "moe_metrics", "no_weight_decay"]

# Resume state a checkpoint may lack (written before the feature existed, or by a run without it): the loaded
# run then starts that part afresh.
_OPTIONAL_STATE = ("fp8",)


def _shared_run_id() -> str:
    """A fresh identifier of this run, the same on every rank (rank 0 draws it)."""
    box = [uuid.uuid4().hex]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Norm weights and biases (and any other 1-D parameter) get no weight decay."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.rsplit(".", 2)[-2]


@dataclasses.dataclass
class StepOutput:
    """What one training step did (identical on every rank)."""

    step: int
    loss: float
    applied: bool
    grad_norm: float
    lr: float
    loss_scale: float
    moe: dict[str, float] | None = None
    """MoE layers: aux and z-loss, dropped fraction, tokens per expert per layer (`moe_metrics`); None if dense."""


def moe_metrics(report: MoEStepReport | None) -> dict[str, float] | None:
    """The flat metrics of one step's MoE report: `moe_aux_loss`, `moe_z_loss`, `moe_dropped_fraction` (with a
    capacity factor), and per layer i `moe_load_min/layer{i}`, `moe_load_max/layer{i}`, `moe_load_cv/layer{i}`
    (tokens per expert), with `moe_load_cv_max` the largest CV over the layers."""
    if report is None:
        return None
    out = {"moe_aux_loss": report.aux_loss, "moe_z_loss": report.z_loss}
    if report.dropped_fraction is not None:
        out["moe_dropped_fraction"] = report.dropped_fraction
    summary = report.load_summary()
    for layer, (low, high, cv) in summary.items():
        out.update({f"moe_load_min/layer{layer}": low, f"moe_load_max/layer{layer}": high,
                    f"moe_load_cv/layer{layer}": cv})  # fmt: skip
    out["moe_load_cv_max"] = max(cv for _, _, cv in summary.values())
    return out


class Trainer:
    """One training run described by `cfg`.

    Args:
        cfg: the resolved configuration.
        stream: console stream of the logging rank (default stdout).
    """

    def __init__(self, cfg: RunConfig, *, stream: IO[str] | None = None) -> None:
        self.cfg = cfg
        self.start_time = time.time()
        p = cfg.parallel
        use_cuda = p.device == "cuda" or (p.device == "auto" and torch.cuda.is_available())
        backend = p.backend if p.backend != "auto" else ("nccl" if use_cuda else "gloo")
        if p.overlap_p2p_comm and p.pp > 1 and backend != "gloo":
            raise ValueError(
                f"parallel.overlap_p2p_comm=true is implemented for the gloo backend only, and this run uses {backend} "
                f"(parallel.backend={p.backend}); set parallel.overlap_p2p_comm=false"
            )
        self.env = init_distributed(backend, timeout_s=p.comm_timeout)
        self.device = self.env.device if use_cuda else torch.device("cpu")
        self.dims = ParallelDims.from_config(p, self.env.world_size)
        self.rank = self.env.rank
        # The transport of the gradient buckets, ZeRO-1's gathers and the pipeline transfers (parallel.comm);
        # closed by close(), or here when the rest of the construction fails.
        self.comms = build_comms(self.dims, p.comm, device=self.device, timeout=p.comm_timeout)
        try:
            self._setup(stream)
        except BaseException:
            self.comms.close()
            raise

    def _setup(self, stream: IO[str] | None) -> None:
        """Everything after the topology and the comms: model, optimizer, data, checkpoints, logging."""
        cfg, t = self.cfg, self.cfg.training
        self.tokenizer = load_tokenizer(cfg.data)
        self.model_config = self._resolve_model_config()
        self.precision = cfg.precision
        self.num_microbatches = t.grad_accumulation(self.dims.data_parallel_size)
        self.total_steps = t.total_steps
        self.seq_len = cfg.data.seq_len
        with self._out_of_memory_guard("while building the model and optimizer"):
            self.chunks = self._build_model()
            self.fp8 = Fp8Training([unwrap(chunk) for chunk in self.chunks], self.dims, cfg.fp8)
            self.loss_fn = build_loss_fn(unwrap(self.chunks[-1]), cfg.loss, kernels=cfg.runtime.kernels)
            self.loss_scaler = make_loss_scaler(self.precision)
            self.optimizer = AdamW(self.chunks, self.dims, cfg.optimizer, loss_scaler=self.loss_scaler,
                                   no_decay=no_weight_decay)  # fmt: skip
        self.scheduler = ParamScheduler(self.optimizer, cfg.schedule, cfg.optimizer, self.total_steps)
        self.nonfinite = NonFiniteTracker(t.nonfinite_policy, t.max_consecutive_nonfinite)
        self.step = 0
        self.consumed_samples = 0
        self.skipped_steps = 0
        self.run_id = _shared_run_id()  # a resumed run takes its checkpoint's
        self.history: list[dict[str, Any]] = []
        self._window: list[StepOutput] = []
        self._shown_peaks: list[float] = []  # the per-rank peaks last printed (printed again when one grows)
        train_samples, valid_samples = samples_needed(self.total_steps, t.global_batch_size, t.eval_iters)
        self.train_data, self.valid_data = build_datasets(
            cfg.data,
            train_samples=train_samples,
            valid_samples=valid_samples,
            vocab_size=self.model_config.vocab_size,
            seed=t.seed,
            tokenizer=self.tokenizer,
        )
        ck = cfg.checkpoint
        self.checkpoints = (
            CheckpointManager(ck.save or ck.load, keep_last=ck.keep_last, async_save=ck.async_save)
            if ck.save or ck.load
            else None
        )
        self.run_dir = Path(cfg.logging.run_dir)
        if self.rank == 0:
            probe_writable(self.run_dir, "logging.run_dir")
        if ck.save:
            self.checkpoints.probe()
        self.meter = self._build_meter()
        self.logger = self._build_logger(stream)
        self.logger.message(self._banner())
        if ck.load is not None:
            self.load_checkpoint(ck.load)
        if ck.save:
            self._check_save_folder(ck.save, ck.force)

    # ---- construction ---------------------------------------------------------------------------------

    def _resolve_model_config(self):
        """The model config; with a tokenizer, a vocab_size left at the preset's value follows the tokenizer."""
        model = self.cfg.model
        if self.tokenizer is None:
            return model
        vocab = self.tokenizer.vocab_size
        preset = PRESETS.get(model.preset) if model.preset is not None else None
        if preset is not None and model.vocab_size == preset.vocab_size:
            return model.replace(vocab_size=vocab)
        if model.vocab_size < vocab:
            raise ValueError(f"model.vocab_size ({model.vocab_size}) is smaller than the tokenizer's ({vocab})")
        return model

    def _build_model(self) -> list[DistributedDataParallel]:
        chunks = build_model_chunks(
            self.model_config,
            self.dims,
            parallel=self.cfg.parallel,
            runtime=self.cfg.runtime,
            fp8=self.cfg.fp8,
            seed=self.cfg.training.seed,
            device=self.device,
            dtype=self.precision.param_dtype,
        )
        return [DistributedDataParallel(chunk, self.dims, self.cfg.ddp, comms=self.comms) for chunk in chunks]

    def _build_meter(self) -> ThroughputMeter:
        peak = self.cfg.logging.peak_tflops
        if peak is None and self.device.type == "cuda":
            peak = peak_tflops(torch.cuda.get_device_name(self.device), self.precision.dtype)
        # MoE models: the FLOPs of the experts a token runs through (active parameters only).
        return ThroughputMeter(flops_per_token(self.model_config, self.seq_len), self.env.world_size, peak)

    def _build_logger(self, stream) -> MetricsLogger:
        log = self.cfg.logging
        enabled = self.rank == 0
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.run_dir / "config.yaml")
        return MetricsLogger(
            self.run_dir,
            total_steps=self.total_steps,
            enabled=enabled,
            tensorboard=log.tensorboard,
            wandb_project=log.wandb_project,
            wandb_entity=log.wandb_entity,
            wandb_name=log.wandb_name,
            wandb_config=config_to_dict(self.cfg) if log.wandb_project else None,
            progress_bar=log.progress_bar,
            stream=stream,
        )

    def _banner(self) -> str:
        m, d, t = self.model_config, self.dims, self.cfg.training
        data = "synthetic tokens" if self.cfg.data.use_synthetic else (self.cfg.data.blend or self.cfg.data.train_blend)
        moe = ""
        if m.num_experts:
            moe = (f" ({count_parameters(m, active=True) / 1e6:,.1f}M active; {m.num_experts} experts, top "
                   f"{m.moe_top_k}, in {m.num_moe_layers} layers)")  # fmt: skip
        experts = f" (ep {d.ep} x dp {d.dp})" if d.ep > 1 else ""
        comm = " (dp and pp traffic over megalith's nccl)" if self.cfg.parallel.comm == "nccl" else ""
        return (
            f"model: {m.family}, {count_parameters(m) / 1e6:,.1f}M parameters{moe}, {m.num_layers} layers, "
            f"hidden {m.hidden_size}, vocab {m.vocab_size}\n"
            f"layout: tp {d.tp} x cp {d.cp}{f' ({self.cfg.parallel.cp_comm})' if d.cp > 1 else ''} x pp {d.pp} "
            f"(x{self.cfg.parallel.virtual_stages} virtual) x dp {d.data_parallel_size}{experts} = "
            f"{self.env.world_size} ranks, {self.env.backend}{comm} on {self.device.type}, {self.precision.dtype}"
            f"{self._fp8_banner()}\n"
            f"batch: {t.global_batch_size} x {self.seq_len} tokens per step ({self.num_microbatches} micro-batches "
            f"of {t.micro_batch_size} per rank), {self.total_steps} steps, data: {data}\n"
            f"run directory: {self.run_dir}"
        )

    def _fp8_banner(self) -> str:
        f = self.cfg.fp8
        if not f.enabled:
            return ""
        kept = f" (first {f.first_layers_in_bf16} / last {f.last_layers_in_bf16} layers in {self.precision.dtype})"
        return f", fp8 {f.recipe} {f.format} ({f.backend})" + (kept if f.first_layers_in_bf16 or
                                                              f.last_layers_in_bf16 else "")  # fmt: skip

    def _is_log_step(self, step: int) -> bool:
        return step % self.cfg.logging.log_interval == 0 or step == self.total_steps

    # ---- one step ---------------------------------------------------------------------------------------

    @property
    def hidden_shape(self) -> tuple[int, int, int]:
        seq = self.seq_len // self.dims.cp  # a context-parallel rank's tokens
        seq = seq // self.dims.tp if self.cfg.parallel.sequence_parallel else seq
        return (self.cfg.training.micro_batch_size, seq, self.model_config.hidden_size)

    def forward_backward(self, batches: list[dict], *, forward_only: bool = False) -> float:
        """Runs the micro-batches through the pipeline schedule; the mean loss (same on every rank)."""
        return forward_backward(
            self.chunks,
            batches,
            self.dims,
            hidden_shape=self.hidden_shape,
            dtype=self.precision.param_dtype,
            loss_fn=self.loss_fn,
            loss_scale=1.0 if forward_only else self.loss_scaler.scale,
            forward_only=forward_only,
            comms=self.comms,
            overlap_p2p=self.cfg.parallel.overlap_p2p_comm,
        )

    def train_step(self, batches: list[dict]) -> StepOutput:
        """One optimizer step over this rank's micro-batches; a NaN/Inf loss skips the update."""
        step = self.step + 1
        for chunk in self.chunks:  # dropout masks depend only on (seed, step, rank coordinates): resumable
            unwrap(chunk).rng.reset(
                derive_seed(self.cfg.training.seed, "step", step),
                tp_rank=self.dims.tp_rank,
                pp_rank=self.dims.pp_rank,
                dp_rank=self.dims.data_rank * self.dims.cp + self.dims.cp_rank,  # cp ranks hold different tokens
            )
        lr, scale = self.optimizer.lr, self.loss_scaler.scale
        with self._out_of_memory_guard(f"in training step {step}"):
            self.optimizer.zero_grad()
            self.fp8.set_collect_stats(self._is_log_step(step))  # saturation/underflow counts of logged steps only
            loss = self.forward_backward(batches)
            self.fp8.step()  # delayed scaling: this step's amaxes into the histories (also for a skipped step)
            applied, grad_norm = False, float("nan")
            if self.nonfinite.check(step, loss):  # a router producing NaN makes the loss NaN too
                result = self.optimizer.step()
                applied, grad_norm = result.applied, result.grad_norm
        if applied:
            self.scheduler.step()
        else:
            self.skipped_steps += 1
        # MoE statistics of the step, and the expert-bias update (only after an applied step)
        moe = moe_metrics(finish_moe_step(self.chunks, self.dims, update_bias=applied))
        self.step = step
        self.consumed_samples += self.cfg.training.global_batch_size
        return StepOutput(step, loss, applied, grad_norm, lr, scale, moe)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the first `eval_iters` global batches of the validation data (None without any)."""
        if self.valid_data is None:
            return None
        t = self.cfg.training
        batches = list(self._batches(self.valid_data, 0, t.eval_iters * t.global_batch_size))
        if not batches:
            return None
        self.optimizer.finish_param_gather()  # the last step's gathers (ddp.overlap_param_gather) land first
        for chunk in self.chunks:
            chunk.eval()
        total, count = 0.0, 0
        try:
            with self._out_of_memory_guard(f"in the evaluation after step {self.step}"):
                for i in range(0, len(batches), self.num_microbatches):
                    total += self.forward_backward(batches[i : i + self.num_microbatches], forward_only=True)
                    count += 1
        finally:
            for chunk in self.chunks:
                chunk.train()
        return total / count

    def _batches(self, dataset, consumed: int, total: int) -> Iterator[dict]:
        t = self.cfg.training
        return micro_batches(
            dataset,
            consumed_samples=consumed,
            total_samples=total,
            micro_batch_size=t.micro_batch_size,
            global_batch_size=t.global_batch_size,
            dp_rank=self.dims.data_rank,
            dp=self.dims.data_parallel_size,
            num_workers=self.cfg.data.num_workers,
            device=self.device,
            position_ids=self.cfg.data.reset_position_ids,
            documents=self.cfg.data.reset_attention_mask,
        )

    # ---- the loop -----------------------------------------------------------------------------------------

    def fit(self) -> str:
        """Trains to the end of the run (or a stop request); returns why it stopped."""
        t, ck = self.cfg.training, self.cfg.checkpoint
        duration = None if t.exit_duration_min is None else t.exit_duration_min * 60
        batches = self._batches(self.train_data, self.consumed_samples, self.total_steps * t.global_batch_size)
        reason, saved_at = "finished", self.step
        self._window = []
        self.meter.measure()  # throughput intervals start now, not at construction (data indices, loading)
        with ExitMonitor(duration_s=duration, start_time=self.start_time) as monitor:
            while self.step < self.total_steps:
                out = self.train_step([next(batches) for _ in range(self.num_microbatches)])
                self._record(out)
                if t.eval_interval and self.step % t.eval_interval == 0:
                    self._log_eval()
                if ck.save and ck.save_interval and self.step % ck.save_interval == 0:
                    self.save_checkpoint()
                    saved_at = self.step
                self.on_step_end(out)
                stop = monitor.check()
                if stop is not None:
                    reason = stop
                    self.logger.message(f"stopping at step {self.step}: {stop}")
                    break
        self.optimizer.finish_param_gather()  # the weights the run ends with, for whoever reads them next
        if ck.save and saved_at != self.step:
            self.save_checkpoint()
        if self.checkpoints is not None:
            self.checkpoints.wait()
        return reason

    def on_step_end(self, out: StepOutput) -> None:
        """Called after every step on every rank (a hook for subclasses; does nothing here).

        With `ddp.overlap_param_gather` the step's parameter all-gathers may still be in flight here: an override
        that reads the parameters calls `self.optimizer.finish_param_gather()` first.
        """

    def _record(self, out: StepOutput) -> None:
        tokens = self.cfg.training.global_batch_size * self.seq_len
        self.meter.add_tokens(tokens)
        self.history.append(dataclasses.asdict(out))
        self._window.append(out)
        if not self._is_log_step(self.step):
            return
        finite = [o.loss for o in self._window if math.isfinite(o.loss)]
        norms = [o.grad_norm for o in self._window if o.applied]
        metrics: dict[str, Any] = {
            "loss": sum(finite) / len(finite) if finite else float("nan"),
            "lr": out.lr,
            "grad_norm": sum(norms) / len(norms) if norms else float("nan"),
            **self.meter.measure(),
            **self._memory(),
            "skipped_steps": self.skipped_steps,
            "consumed_samples": self.consumed_samples,
        }
        if self.precision.dtype == "fp16":
            metrics["loss_scale"] = out.loss_scale
        if self.cfg.fp8.enabled:
            metrics.update(self.fp8.metrics())  # collective: every rank records every step
        moe = [o.moe for o in self._window if o.moe is not None]
        for key in moe[0] if moe else ():  # averaged over the logging interval
            metrics[key] = sum(m[key] for m in moe) / len(moe)
        self._window = []
        self.logger.log(self.step, metrics)

    def _memory(self) -> dict[str, Any]:
        """Every rank's peak memory (a collective: all ranks log at the same steps). With several ranks a line
        with each rank's peaks is printed at the first log and again whenever one has grown by over 5%."""
        allocated, reserved = peak_memory_per_rank(self.device)
        cuda = self.device.type == "cuda"
        peaks = allocated + reserved
        shown = self._shown_peaks
        grown = not shown or any(new > 1.05 * old for new, old in zip(peaks, shown, strict=True))
        if len(allocated) > 1 and grown:
            self._shown_peaks = peaks
            self.logger.message(format_memory_per_rank(allocated, reserved, cuda=cuda))
        return memory_metrics(allocated, reserved, cuda=cuda)

    def _layout(self) -> dict[str, Any]:
        """What decides memory per device, for the out-of-memory message."""
        p, t = self.cfg.parallel, self.cfg.training
        return {
            "tp": self.dims.tp, "pp": self.dims.pp, "virtual_stages": p.virtual_stages, "dp": self.dims.dp,
            "micro_batch_size": t.micro_batch_size, "seq_len": self.seq_len, "precision": self.precision.dtype,
            "recompute": self.cfg.runtime.recompute, "distributed_optimizer": self.cfg.ddp.use_distributed_optimizer,
            "compile": self.cfg.runtime.compile,
        }  # fmt: skip

    @contextlib.contextmanager
    def _out_of_memory_guard(self, where: str):
        """Turns torch's out-of-memory error into a TrainingOutOfMemoryError naming the layout and the knobs."""
        try:
            yield
        except torch.cuda.OutOfMemoryError as exc:
            message = out_of_memory_message(exc, where=where, rank=self.rank, device=self.device,
                                            layout=self._layout())  # fmt: skip
            raise TrainingOutOfMemoryError(message) from exc

    def _log_eval(self) -> None:
        loss = self.evaluate()
        if loss is not None:
            self.logger.log_eval(self.step, loss)
            self.history.append({"step": self.step, "eval_loss": loss})

    # ---- checkpoints --------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Saves model, optimizer, schedule, loss scale, RNG and data position as checkpoint `self.step`."""
        ck = self.cfg.checkpoint
        manager = self.checkpoints
        self.optimizer.finish_param_gather()  # with ddp.overlap_param_gather, the last step's gathers land first
        state = model_state(self.chunks)
        if ck.save_optimizer:
            state.update(optimizer_state(self.optimizer))
            state.update(self.fp8.sharded_state())
        tok = self.cfg.data.tokenizer_model
        tok_dir = tok if tok is not None and os.path.isdir(tok) else None
        start = time.perf_counter()
        manager.save(self.step, state, extra=self._extra_state(), model_config=self.model_config.to_dict(),
                     tokenizer_dir=tok_dir)  # fmt: skip
        path = manager.root / f"iter_{self.step:07d}"
        what = "queued" if ck.async_save else "saved"
        self.logger.message(f"checkpoint {what}: {path} ({time.perf_counter() - start:.2f} s)")
        return path

    def _check_save_folder(self, root: str, force: bool) -> None:
        """Refuses to save into a folder whose latest checkpoint belongs to another run (unless `force`)."""
        ckpt = find_checkpoint(root)
        if ckpt is None:
            return
        try:
            other = ((read_info(ckpt).get("extra") or {}).get("trainer") or {}).get("run_id")
        except ValueError as exc:  # corrupt: still another run's folder as far as we can tell
            other = f"unreadable ({exc})"
        if other == self.run_id:
            return
        if force:
            self.logger.message(f"checkpoint.save {root} holds another run's checkpoints; saving there anyway (force)")
            return
        raise ValueError(
            f"checkpoint.save {root} already holds checkpoints of another run (latest {ckpt.name}); resume that "
            f"run with --load {root}, choose another checkpoint.save, or pass --force (checkpoint.force=true) to "
            f"save into it anyway"
        )

    # ---- resume state: declared once, saved and restored through the same table -----------------------------

    def state_dict(self) -> dict[str, Any]:
        """The loop's own counters (the trainer is one of the stateful objects a checkpoint restores)."""
        return {
            "run_id": self.run_id,
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = str(state["run_id"])
        self.step = int(state["step"])
        self.consumed_samples = int(state["consumed_samples"])
        self.skipped_steps = int(state["skipped_steps"])

    def _stateful(self) -> dict[str, Any]:
        """Everything a resume restores besides tensors and RNG states, by name in the checkpoint's JSON."""
        stateful = {
            "trainer": self,
            "optimizer": AdamCounters(self.optimizer),
            "scheduler": self.scheduler,
            "loss_scaler": self.loss_scaler,
            "nonfinite": self.nonfinite,
        }
        if self.cfg.fp8.enabled:
            stateful["fp8"] = self.fp8
        return stateful

    def _extra_state(self) -> dict[str, Any]:
        extra = {name: obj.state_dict() for name, obj in self._stateful().items()}
        extra["info"] = {  # for people reading megalith.json; not restored
            "layout": {
                "tp": self.dims.tp,
                "cp": self.dims.cp,
                "pp": self.dims.pp,
                "ep": self.dims.ep,
                "dp": self.dims.data_parallel_size,
            },
            "tokenizer": {"type": self.cfg.data.tokenizer_type, "model": self.cfg.data.tokenizer_model},
            "seq_len": self.seq_len,
        }
        return extra

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Resumes from the latest complete checkpoint under `path` (or loads a model-only one as a start).

        A checkpoint with optimizer state resumes the run exactly (weights, optimizer, schedule, loss scale,
        RNG, data position) unless `checkpoint.finetune` or `load_optimizer=false`; a model-only one (e.g.
        written by `megalith-import hf`) only sets the weights and starts at step 0 with a fresh optimizer.
        """
        ck = self.cfg.checkpoint
        self.optimizer.finish_param_gather()  # an in-flight gather would overwrite the loaded weights
        ckpt = find_checkpoint(path)
        if ckpt is None:
            if ck.save is not None and Path(path).resolve() == Path(ck.save).resolve():
                self.logger.message(f"no checkpoint in {path} yet: starting from scratch")
                return
            raise FileNotFoundError(f"checkpoint.load: no complete checkpoint in {path}")
        info = read_info(ckpt)
        check_model_config(info.get("model_config"), self.model_config.to_dict(), str(ckpt))
        resume = has_optimizer_state(ckpt) and ck.load_optimizer and not ck.finetune
        state = model_state(self.chunks)
        if resume:
            state.update(optimizer_state(self.optimizer))
            state.update(self._fp8_resume_state(ckpt, info))
        loaded = self.checkpoints.load(state, ckpt, load_rng=ck.load_rng and resume, verify=ck.verify)
        if not resume:
            masters_from_params(self.optimizer)
            self.optimizer.sync_params_from_master()
            self.logger.message(f"loaded model weights from {loaded.path} (fresh optimizer, step 0)")
            return
        self.optimizer.sync_params_from_master()
        missing = [name for name in self._stateful() if name not in loaded.extra and name not in _OPTIONAL_STATE]
        if missing:
            raise ValueError(f"{loaded.path}: megalith.json lacks the resume state {missing}")
        for name, obj in self._stateful().items():
            if name in loaded.extra:
                obj.load_state_dict(loaded.extra[name])
        self.logger.message(f"resumed from {loaded.path} at step {self.step}")

    def _fp8_resume_state(self, ckpt: Path, info: dict[str, Any]) -> dict[str, Any]:
        """The delayed-scaling tensors to restore from `ckpt` (none: scaling starts afresh, as in a new run)."""
        if not self.fp8.delayed:
            return {}
        saved = (info.get("extra") or {}).get("fp8")
        state = self.fp8.resume_state(read_tensor_metadata(ckpt), saved, ckpt)
        if not state:
            self.logger.message(f"{ckpt} has no delayed-scaling state for these fp8 layers: scaling starts afresh")
        return state

    def close(self) -> None:
        """Waits for checkpoint writes, closes the logs and the comms (call on every rank; again does nothing)."""
        try:
            if self.checkpoints is not None:
                self.checkpoints.wait()
            self.logger.close()
        finally:
            self.comms.close()
