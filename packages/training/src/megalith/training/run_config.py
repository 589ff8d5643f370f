"""The full `megalith-train` configuration: each component's own config, composed (never translated).

`RunConfig` is what `megalith-train --config FILE section.field=value ...` resolves. Its sections are the very
config classes the components take: `model` is `megalith.core.ModelConfig` (a preset plus overrides:
`model.preset=llama3-1b model.num_layers=4`), `runtime`, `loss`, `parallel`, `precision`, `fp8`, `ddp` and
`optimizer` come from megalith.core, `schedule`, `training`, `checkpoint` and `logging` from the training loop,
and `data` is defined here. The checks that span sections live in `RunConfig.__post_init__`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from megalith.core.config import PRESETS, ModelConfig, RuntimeConfig, check_expert_parallel, check_tensor_parallel
from megalith.core.distributed import DDPConfig, OptimizerConfig
from megalith.core.fields import option
from megalith.core.fp8 import Fp8Config
from megalith.core.loss import LossConfig
from megalith.core.parallel_dims import ParallelConfig
from megalith.core.precision import PrecisionConfig
from megalith.training.config import CheckpointConfig, LoggingConfig, ScheduleConfig, TrainingConfig, check

__all__ = ["DataConfig", "RunConfig"]


@dataclasses.dataclass(kw_only=True, frozen=True)
class DataConfig:
    """Training data: a blend of .bin/.idx prefixes (or synthetic tokens), the split, the tokenizer."""

    blend: str | None = option(
        None, help="'prefix', 'prefixA prefixB' or '0.3 prefixA 0.7 prefixB'; split by data.split."
    )
    train_blend: str | None = option(None, help="Blend of the training split only (instead of blend + split).")
    valid_blend: str | None = option(None, help="Blend of the validation split only.")
    split: str = option("969,30,1", help="Train/valid/test fractions of every dataset in blend.")
    synthetic: bool | None = option(
        None, help="Deterministic synthetic token sequences instead of files; None: when no blend is set."
    )
    tokenizer_type: str | None = option(
        None,
        help="HuggingFaceTokenizer, GPT2BPETokenizer, TikTokenizer, SentencePieceTokenizer, ByteTokenizer or "
        "NullTokenizer.",
    )
    tokenizer_model: str | None = option(None, help="Tokenizer file or directory (copied into checkpoints).")
    vocab_size: int | None = option(
        None, help="NullTokenizer only: the number of ordinary token ids (Megatron-LM's --vocab-size)."
    )
    seq_len: int = option(128, help="Tokens per training sample.")
    num_workers: int = option(0, help="DataLoader worker processes per rank (0: load in the training process).")
    eod_mask_loss: bool = option(False, help="Do not compute loss on end-of-document tokens.")
    reset_position_ids: bool = option(
        False, help="Positions restart at 0 at every document of a packed sample (a document starts after each EOD)."
    )
    reset_attention_mask: bool = option(
        False,
        help="Attention never crosses a document boundary inside a packed sample (varlen attention over the "
        "documents' cu_seqlens, no S x S mask).",
    )
    cache_dir: str | None = option(None, help="Where dataset index caches go (default: next to the data).")

    @property
    def use_synthetic(self) -> bool:
        return bool(self.synthetic) or (self.synthetic is None and self.blend is None and self.train_blend is None)

    def __post_init__(self) -> None:
        check(self.seq_len >= 1, f"seq_len must be >= 1, got {self.seq_len}")
        check(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        has_files = self.blend is not None or self.train_blend is not None
        check(
            not (self.synthetic and has_files), "set either synthetic=true or a blend (blend / train_blend), not both"
        )
        check(
            not (self.blend is not None and (self.train_blend or self.valid_blend)),
            "set either blend (with split) or train_blend/valid_blend, not both",
        )
        check(
            self.synthetic is not False or has_files,
            "no training data: synthetic is false and no blend is set (data.blend or data.train_blend)",
        )
        check(
            self.tokenizer_model is None or self.tokenizer_type is not None,
            f"tokenizer_model is set ({self.tokenizer_model!r}) but tokenizer_type is not",
        )
        null = self.tokenizer_type == "NullTokenizer"
        check(
            (self.vocab_size is not None) == null,
            "tokenizer_type NullTokenizer needs data.vocab_size"
            if null
            else f"data.vocab_size ({self.vocab_size}) is for tokenizer_type NullTokenizer only",
        )
        check(self.vocab_size is None or self.vocab_size >= 1, f"vocab_size must be >= 1, got {self.vocab_size}")
        for name in ("reset_position_ids", "reset_attention_mask"):
            check(
                not (getattr(self, name) and self.use_synthetic),
                f"data.{name} needs documents separated by end-of-document tokens: set data.blend or "
                "data.train_blend (synthetic data has none)",
            )


def _moved(new: str) -> str:
    return f"was renamed: write {new!r} instead"


@dataclasses.dataclass(kw_only=True, frozen=True)
class RunConfig:
    """Everything one `megalith-train` run needs."""

    model: ModelConfig = option(factory=lambda: PRESETS["tiny"], help="Model architecture (a preset + overrides).")
    runtime: RuntimeConfig = option(factory=RuntimeConfig, help="Kernels, recomputation, dropout, compile.")
    loss: LossConfig = option(factory=LossConfig, help="Training loss.")
    parallel: ParallelConfig = option(factory=ParallelConfig, help="Parallel layout.")
    precision: PrecisionConfig = option(factory=PrecisionConfig, help="Numeric format and fp16 loss scaling.")
    fp8: Fp8Config = option(factory=Fp8Config, help="fp8 matmuls in the transformer blocks' linear layers.")
    ddp: DDPConfig = option(factory=DDPConfig, help="Gradient buckets and the distributed optimizer (ZeRO-1).")
    optimizer: OptimizerConfig = option(factory=OptimizerConfig, help="Optimizer.")
    schedule: ScheduleConfig = option(factory=ScheduleConfig, help="Learning-rate and weight-decay schedule.")
    training: TrainingConfig = option(factory=TrainingConfig, help="Batch, length, evaluation, seed.")
    checkpoint: CheckpointConfig = option(factory=CheckpointConfig, help="Checkpoints.")
    logging: LoggingConfig = option(factory=LoggingConfig, help="Logging.")
    data: DataConfig = option(factory=DataConfig, help="Training data.")

    RENAMED_KEYS: ClassVar[dict[str, str]] = {
        "model.kernels": _moved("runtime.kernels"),
        "model.recompute": _moved("runtime.recompute"),
        "model.recompute_every": _moved("runtime.recompute_every"),
        "model.hidden_dropout": _moved("runtime.hidden_dropout"),
        "model.attention_dropout": _moved("runtime.attention_dropout"),
        "model.label_smoothing": _moved("loss.label_smoothing"),
        "parallel.recompute": _moved("runtime.recompute"),
        "parallel.precision": _moved("precision.dtype"),
        "parallel.initial_loss_scale": _moved("precision.initial_loss_scale"),
        "parallel.loss_scale_window": _moved("precision.loss_scale_window"),
        "parallel.bucket_size": _moved("ddp.bucket_size"),
        "parallel.overlap_grad_reduce": _moved("ddp.overlap_grad_reduce"),
        "parallel.distributed_optimizer": _moved("ddp.use_distributed_optimizer"),
        "training.compile": "is spelled 'runtime.compile' (compilation is part of how the model runs)",
        "parallel.fsdp": "was removed: megalith-train has no FSDP2 mode; use ddp.use_distributed_optimizer=true",
    }
    REJECTED_VALUES: ClassVar[dict[tuple[str, str], str]] = {
        (key, "fp8"): "fp8 is not a parameter dtype: set fp8.recipe=tensorwise|delayed|rowwise (parameters stay "
        "in precision.dtype, bf16 or fp32)"
        for key in ("precision.dtype", "parallel.precision")
    }

    def __post_init__(self) -> None:
        model, p, t = self.model, self.parallel, self.training
        check(
            self.data.seq_len <= model.max_seq_len,
            f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({model.max_seq_len})",
        )
        check_tensor_parallel(model, p.tp)
        check_expert_parallel(model, p.ep, p.resolved_expert_tp)
        stages = p.pp * p.virtual_stages
        if p.layers_per_stage is None:
            check(
                model.num_layers % stages == 0,
                f"model.num_layers ({model.num_layers}) is not divisible by parallel.pp * virtual_stages ({stages})",
            )
        else:
            check(
                len(p.layers_per_stage) == stages and sum(p.layers_per_stage) == model.num_layers,
                f"parallel.layers_per_stage {p.layers_per_stage} must have {stages} entries summing to "
                f"model.num_layers ({model.num_layers})",
            )
        check(
            self.data.seq_len % (2 * p.cp) == 0,
            f"data.seq_len ({self.data.seq_len}) is not divisible by 2 * parallel.cp = {2 * p.cp} (context "
            f"parallelism cuts every sequence into 2 * cp chunks)",
        )
        local = self.data.seq_len // p.cp
        check(
            not p.sequence_parallel or local % p.tp == 0,
            f"data.seq_len ({self.data.seq_len}) / parallel.cp ({p.cp}) is not divisible by parallel.tp ({p.tp}) "
            "(sequence_parallel)"
            if p.cp > 1
            else f"data.seq_len ({self.data.seq_len}) is not divisible by parallel.tp ({p.tp}) (sequence_parallel)",
        )
        check(
            p.cp == 1 or self.runtime.attention_dropout == 0,
            f"runtime.attention_dropout ({self.runtime.attention_dropout}) must be 0 under context parallelism "
            f"(parallel.cp={p.cp}): the attention kernel has no dropout",
        )
        if t.eval_interval is not None:
            check(
                self.data.use_synthetic or self.data.valid_blend is not None or self.data.blend is not None,
                "training.eval_interval is set but there is no validation data (data.blend or data.valid_blend)",
            )
        check(
            self.schedule.warmup_steps <= t.total_steps,
            f"schedule.warmup_steps ({self.schedule.warmup_steps}) exceeds the run length ({t.total_steps} steps)",
        )
        check(
            not (self.fp8.enabled and self.precision.dtype == "fp16"),
            f"fp8.recipe={self.fp8.recipe} cannot be combined with precision.dtype=fp16 (fp16 loss scaling and fp8 "
            f"scaling do not compose); use precision.dtype=bf16",
        )
        check(
            not (self.ddp.overlap_param_gather and self.runtime.compile),
            "ddp.overlap_param_gather=true cannot be combined with runtime.compile=true: the forward pre-hooks that "
            "wait for each parameter gather would run inside the compiled blocks; turn one of them off",
        )
        check(
            self.schedule.min_lr <= self.optimizer.lr,
            f"schedule.min_lr ({self.schedule.min_lr}) exceeds optimizer.lr ({self.optimizer.lr})",
        )
