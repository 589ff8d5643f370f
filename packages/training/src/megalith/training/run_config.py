"""The full `megalith-train` configuration: the training sections plus model, parallel and data.

`RunConfig` is what `megalith-train --config FILE section.field=value ...` resolves. The model section is a
preset name plus optional overrides of any `ModelConfig` field (`model.preset=llama3-1b model.num_layers=4`);
`RunConfig.model.resolve()` turns it into the `ModelConfig` the run trains.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_type_hints

from megalith.core.config import PRESETS, ModelConfig, get_preset
from megalith.training.config import TrainConfig
from megalith.training.config_tree import _field_docstrings, option

__all__ = ["DataConfig", "ModelSection", "ParallelConfig", "RunConfig"]

# ModelConfig fields the parallel section owns (recompute) or that make no sense to set per run.
_MODEL_FIELDS_OWNED_ELSEWHERE = ("recompute",)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _resolve_model(self) -> ModelConfig:
    """The ModelConfig: the preset with every field that is not None applied over it."""
    overrides = {
        f.name: getattr(self, f.name)
        for f in dataclasses.fields(self)
        if f.name != "preset" and getattr(self, f.name) is not None
    }
    if self.preset is None:
        missing = [n for n in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                               "ffn_hidden_size", "max_seq_len") if n not in overrides]  # fmt: skip
        _check(not missing, f"preset is null, so these fields must be set: {', '.join(missing)}")
        return ModelConfig(**overrides)
    return get_preset(self.preset, **overrides)


def _model_post_init(self) -> None:
    _check(
        self.preset is None or self.preset in PRESETS,
        f"preset {self.preset!r} is not one of {', '.join(sorted(PRESETS))}",
    )
    try:
        self.resolve()
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def _make_model_section() -> type:
    """A frozen kw-only dataclass: `preset` plus every ModelConfig field as an optional override."""
    hints = get_type_hints(ModelConfig)
    docs = _field_docstrings(ModelConfig)
    fields: list[tuple[str, Any, Any]] = [
        ("preset", str | None, option("tiny", help=f"Named architecture: {', '.join(PRESETS)} (null: none)."))
    ]
    for f in dataclasses.fields(ModelConfig):
        if f.name in _MODEL_FIELDS_OWNED_ELSEWHERE:
            continue
        tp = hints[f.name]
        tp = tp if type(None) in getattr(tp, "__args__", ()) else tp | None
        text = docs.get(f.name) or f"ModelConfig.{f.name}"
        fields.append((f.name, tp, option(None, help=f"{text} (null: the preset's value).")))
    return dataclasses.make_dataclass(
        "ModelSection",
        fields,
        kw_only=True,
        frozen=True,
        namespace={
            "__doc__": "Model: a preset plus overrides of its ModelConfig fields.",
            "__post_init__": _model_post_init,
            "resolve": _resolve_model,
            "__module__": __name__,
        },
    )


ModelSection = _make_model_section()


@dataclasses.dataclass(kw_only=True, frozen=True)
class ParallelConfig:
    """Parallel layout (dp is what the world size leaves), precision, recomputation, gradient buckets."""

    tp: int = option(1, help="Tensor-parallel degree.")
    pp: int = option(1, help="Pipeline-parallel degree.")
    dp: int | None = option(None, help="Data-parallel degree; None: world_size / (tp * pp). Checked when set.")
    virtual_stages: int = option(1, help="Model chunks per pipeline rank (>1: interleaved 1F1B).")
    layers_per_stage: list[int] | None = option(  # noqa: RUF009 (option() returns dataclasses.field)
        None, help="Layers of each virtual stage (default: even split)."
    )
    sequence_parallel: bool = option(False, help="Shard activations along the sequence between layers (tp > 1).")
    distributed_optimizer: bool = option(False, help="ZeRO-1: shard fp32 master weights and Adam moments over dp.")
    fsdp: bool = option(False, help="FSDP2 (ZeRO-3) instead of our DDP; not supported by megalith-train yet.")
    precision: Literal["bf16", "fp16", "fp32"] = option("fp32", help="Parameter/activation dtype.")
    initial_loss_scale: float = option(2.0**16, help="fp16: the starting dynamic loss scale.")
    loss_scale_window: int = option(1000, help="fp16: clean steps before the loss scale grows.")
    recompute: Literal["none", "selective", "full"] = option("none", help="Activation recomputation.")
    bucket_size: int | None = option(40_000_000, help="Gradient bucket size in elements (None: one bucket).")
    overlap_grad_reduce: bool = option(True, help="Reduce each gradient bucket during backward.")
    backend: Literal["auto", "nccl", "gloo"] = option("auto", help="Process-group backend (auto: NCCL on GPUs).")
    device: Literal["auto", "cuda", "cpu"] = option("auto", help="Where to train (auto: a GPU when present).")

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "virtual_stages"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _check(self.dp is None or self.dp >= 1, f"dp must be >= 1, got {self.dp}")
        _check(
            self.virtual_stages == 1 or self.pp > 1,
            f"virtual_stages ({self.virtual_stages}) > 1 needs pp > 1 (pp={self.pp})",
        )
        _check(not self.sequence_parallel or self.tp > 1, "sequence_parallel needs tp > 1")
        _check(
            not self.fsdp,
            "fsdp=true is not supported by megalith-train yet; use distributed_optimizer=true (ZeRO-1)",
        )
        _check(self.bucket_size is None or self.bucket_size >= 1, f"bucket_size must be >= 1, got {self.bucket_size}")
        _check(self.initial_loss_scale >= 1, f"initial_loss_scale must be >= 1, got {self.initial_loss_scale}")
        _check(self.loss_scale_window >= 1, f"loss_scale_window must be >= 1, got {self.loss_scale_window}")

    def data_parallel(self, world_size: int) -> int:
        """dp for `world_size` ranks; raises naming the degrees when they do not fit."""
        other = self.tp * self.pp
        if world_size % other:
            raise ValueError(f"parallel: world size {world_size} is not divisible by tp ({self.tp}) * pp ({self.pp})")
        dp = world_size // other
        if self.dp is not None and self.dp != dp:
            raise ValueError(
                f"parallel.dp ({self.dp}) does not match world size {world_size} / (tp {self.tp} * pp {self.pp}) = {dp}"
            )
        return dp


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
    cache_dir: str | None = option(None, help="Where dataset index caches go (default: next to the data).")

    @property
    def use_synthetic(self) -> bool:
        return bool(self.synthetic) or (self.synthetic is None and self.blend is None and self.train_blend is None)

    def __post_init__(self) -> None:
        _check(self.seq_len >= 1, f"seq_len must be >= 1, got {self.seq_len}")
        _check(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        has_files = self.blend is not None or self.train_blend is not None
        _check(
            not (self.synthetic and has_files), "set either synthetic=true or a blend (blend / train_blend), not both"
        )
        _check(
            not (self.blend is not None and (self.train_blend or self.valid_blend)),
            "set either blend (with split) or train_blend/valid_blend, not both",
        )
        _check(
            self.synthetic is not False or has_files,
            "no training data: synthetic is false and no blend is set (data.blend or data.train_blend)",
        )
        _check(
            self.tokenizer_model is None or self.tokenizer_type is not None,
            f"tokenizer_model is set ({self.tokenizer_model!r}) but tokenizer_type is not",
        )
        null = self.tokenizer_type == "NullTokenizer"
        _check(
            (self.vocab_size is not None) == null,
            "tokenizer_type NullTokenizer needs data.vocab_size"
            if null
            else f"data.vocab_size ({self.vocab_size}) is for tokenizer_type NullTokenizer only",
        )
        _check(self.vocab_size is None or self.vocab_size >= 1, f"vocab_size must be >= 1, got {self.vocab_size}")


@dataclasses.dataclass(kw_only=True, frozen=True)
class RunConfig(TrainConfig):
    """Everything one `megalith-train` run needs."""

    model: ModelSection = option(factory=ModelSection, help="Model.")  # noqa: RUF009 (option() returns dataclasses.field)
    parallel: ParallelConfig = option(factory=ParallelConfig, help="Parallel layout and precision.")  # noqa: RUF009 (option() returns dataclasses.field)
    data: DataConfig = option(factory=DataConfig, help="Training data.")  # noqa: RUF009 (option() returns dataclasses.field)

    def __post_init__(self) -> None:
        super().__post_init__()
        model = self.model.resolve()
        _check(
            self.data.seq_len <= model.max_seq_len,
            f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({model.max_seq_len})",
        )
        p = self.parallel
        heads = (("num_attention_heads", model.num_attention_heads), ("num_kv_heads", model.num_kv_heads),
                 ("ffn_hidden_size", model.ffn_hidden_size))  # fmt: skip
        for name, value in heads:
            _check(value % p.tp == 0, f"model.{name} ({value}) is not divisible by parallel.tp ({p.tp})")
        stages = p.pp * p.virtual_stages
        if p.layers_per_stage is None:
            _check(
                model.num_layers % stages == 0,
                f"model.num_layers ({model.num_layers}) is not divisible by parallel.pp * virtual_stages ({stages})",
            )
        else:
            _check(
                len(p.layers_per_stage) == stages and sum(p.layers_per_stage) == model.num_layers,
                f"parallel.layers_per_stage {p.layers_per_stage} must have {stages} entries summing to "
                f"model.num_layers ({model.num_layers})",
            )
        _check(
            not p.sequence_parallel or self.data.seq_len % p.tp == 0,
            f"data.seq_len ({self.data.seq_len}) is not divisible by parallel.tp ({p.tp}) (sequence_parallel)",
        )
        if self.training.eval_interval is not None:
            _check(
                self.data.use_synthetic or self.data.valid_blend is not None or self.data.blend is not None,
                "training.eval_interval is set but there is no validation data (data.blend or data.valid_blend)",
            )

    def model_config(self) -> ModelConfig:
        """The resolved ModelConfig (with the parallel section's recompute setting)."""
        return self.model.resolve().replace(recompute=self.parallel.recompute)
