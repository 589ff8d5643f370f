"""Configuration tree: files, overrides, validation messages, unknown keys, dump, help; and the schedules."""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import ClassVar

import pytest
import torch
import yaml

from megalith.core.distributed import OptimizerConfig
from megalith.core.fields import option
from megalith.training.config import (
    CheckpointConfig,
    LoggingConfig,
    ScheduleConfig,
    TrainingConfig,
    parse_cli,
)
from megalith.training.config_tree import (
    ConfigError,
    config_to_dict,
    dump_config,
    format_config_help,
    load_config,
)
from megalith.training.run_config import RunConfig as MegalithRunConfig
from megalith.training.schedules import ParamScheduler, lr_at, weight_decay_at

SIZES = {"small": {"num_layers": 2, "hidden_size": 64}, "big": {"num_layers": 8, "hidden_size": 512}}


@dataclasses.dataclass(kw_only=True, frozen=True)
class ToyModel:
    """A model section of the application's own, starting from a named size."""

    size: str | None = option(None, help="Named size the other fields start from.")
    num_layers: int = option(help="Transformer layers.")
    rope_scaling: dict | None = option(None, help="RoPE scaling.")
    norm: str = option("rmsnorm", help="Norm kind.")
    hidden_size: int = option(help="Width of the residual stream.")

    @classmethod
    def config_defaults(cls, data):
        size = data.get("size", "small")
        return SIZES[size] if size is not None else {}


@dataclasses.dataclass(kw_only=True, frozen=True)
class RunConfig:
    model: ToyModel = option(factory=lambda: ToyModel(**SIZES["small"]), help="Model.")
    optimizer: OptimizerConfig = option(factory=OptimizerConfig, help="Optimizer.")
    schedule: ScheduleConfig = option(factory=ScheduleConfig, help="Schedule.")
    training: TrainingConfig = option(factory=TrainingConfig, help="Training.")
    checkpoint: CheckpointConfig = option(factory=CheckpointConfig, help="Checkpoints.")
    logging: LoggingConfig = option(factory=LoggingConfig, help="Logging.")

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"model.layers": "was renamed: write 'model.num_layers' instead"}


def test_yaml_and_toml_with_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("optimizer:\n  lr: 1.0e-3\nmodel:\n  num_layers: 4\n")
    (tmp_path / "a.toml").write_text("[optimizer]\nlr = 1e-3\n[model]\nnum_layers = 4\n")
    for name in ("a.yaml", "a.toml"):
        cfg = load_config(
            RunConfig,
            tmp_path / name,
            ["optimizer.lr=3e-4", "training.train_iters=7", "model.rope_scaling={factor: 8}"],
        )
        assert cfg.optimizer.lr == 3e-4 and isinstance(cfg.optimizer.lr, float)
        assert cfg.model.num_layers == 4 and cfg.training.train_iters == 7
        assert cfg.model.rope_scaling == {"factor": 8}
        assert cfg.training.total_steps == 7
    # The section starts from its named size; given fields win; a renamed key names the new one.
    cfg = load_config(RunConfig, None, ["model.size=big", "model.num_layers=3"])
    assert (cfg.model.size, cfg.model.num_layers, cfg.model.hidden_size) == ("big", 3, 512)
    with pytest.raises(ConfigError, match=r"config key 'model.layers' \(in the overrides\) was renamed: write 'model"):
        load_config(RunConfig, None, ["model.layers=3"])


def test_validation_messages_name_field_and_value():
    with pytest.raises(ConfigError, match=r"optimizer: OptimizerConfig.lr must be > 0, got -1\.0"):
        load_config(MegalithRunConfig, None, ["optimizer.lr=-1"])
    with pytest.raises(ConfigError, match=r"training\.micro_batch_size: expected an integer, got 'abc'"):
        load_config(MegalithRunConfig, None, ["training.micro_batch_size=abc"])
    with pytest.raises(ConfigError, match=r"global_batch_size \(10\) is not a multiple of micro_batch_size \(4\)"):
        load_config(MegalithRunConfig, None, ["training.global_batch_size=10", "training.micro_batch_size=4"])
    with pytest.raises(ConfigError, match=r"schedule\.decay_style: 'cosin' is not one of"):
        load_config(MegalithRunConfig, None, ["schedule.decay_style=cosin"])
    with pytest.raises(ConfigError, match=r"set exactly one of train_iters \(5\) and train_samples \(10\)"):
        load_config(MegalithRunConfig, None, ["training.train_iters=5", "training.train_samples=10"])
    with pytest.raises(ConfigError, match=r"warmup_steps \(50\) exceeds the run length \(20 steps\)"):
        load_config(MegalithRunConfig, None, ["training.train_iters=20", "schedule.warmup_steps=50"])
    with pytest.raises(ConfigError, match=r"not divisible by micro_batch_size \* dp \(2 \* 3\)"):
        TrainingConfig(micro_batch_size=2, global_batch_size=8).grad_accumulation(3)
    assert TrainingConfig(micro_batch_size=2, global_batch_size=8).grad_accumulation(2) == 2
    for bad in ("0", "-3"):
        with pytest.raises(ConfigError, match=rf"comm_timeout must be a finite number of seconds > 0, got {bad}\.0"):
            load_config(MegalithRunConfig, None, [f"parallel.comm_timeout={bad}"])
    with pytest.raises(ConfigError, match=r"parallel\.comm_timeout: expected a finite number, got inf"):
        load_config(MegalithRunConfig, None, ["parallel.comm_timeout=inf"])


def test_unknown_keys_get_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer\.l_r'; did you mean 'optimizer\.lr'\?"):
        load_config(MegalithRunConfig, None, ["optimizer.l_r=1"])
    (tmp_path / "c.yaml").write_text("optimiser:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optimiser'; did you mean 'optimizer'\?"):
        load_config(MegalithRunConfig, tmp_path / "c.yaml")
    (tmp_path / "bad.yaml").write_text("optimizer: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: cannot parse"):
        load_config(MegalithRunConfig, tmp_path / "bad.yaml")


def test_dump_round_trips_and_help_lists_every_field(tmp_path):
    cfg = load_config(RunConfig, None, ["model.num_layers=3", "checkpoint.save=/x"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(RunConfig, tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["num_layers"] == 3
    text = format_config_help(RunConfig)
    for section in ("optimizer", "schedule", "training", "checkpoint", "logging", "model"):
        sub = getattr(cfg, section)
        for f in dataclasses.fields(sub):
            assert f"{section}.{f.name} (" in text, f"{section}.{f.name} missing from help"
    assert "Peak learning rate" in text
    assert "model.hidden_size (int, default required)\n      Width of the residual stream." in text
    assert set(config_to_dict(cfg)) == {"optimizer", "schedule", "training", "checkpoint", "logging", "model"}


def test_cli(tmp_path, capsys):
    (tmp_path / "c.toml").write_text("[training]\ntrain_iters = 3\n")
    args = parse_cli(
        RunConfig,
        ["--config", str(tmp_path / "c.toml"), "optimizer.lr=0.01", "--model.num_layers", "6", "--print-config"],
    )
    assert args.print_config and args.config.optimizer.lr == 0.01 and args.config.model.num_layers == 6
    assert args.config.training.train_iters == 3
    with pytest.raises(SystemExit):
        parse_cli(RunConfig, ["--help"])
    assert "model.num_layers (int, default required)" in capsys.readouterr().out


def _sched(**kw):
    return ScheduleConfig(**kw)


def test_lr_schedules_hit_their_defining_points():
    peak, lo, total = 1.0, 0.1, 110
    s = _sched(warmup_steps=10, decay_style="cosine", min_lr=lo)
    assert lr_at(0, s, peak, total) == pytest.approx(0.1)  # first warmup update
    assert lr_at(9, s, peak, total) == pytest.approx(peak)
    assert lr_at(59, s, peak, total) == pytest.approx((peak + lo) / 2)  # half of the 100 decay steps done
    assert lr_at(109, s, peak, total) == pytest.approx(lo)
    assert lr_at(500, s, peak, total) == pytest.approx(lo)
    s = _sched(warmup_steps=10, decay_style="linear", min_lr=lo)
    assert lr_at(34, s, peak, total) == pytest.approx(peak - 0.25 * (peak - lo))
    s = _sched(warmup_steps=10, decay_style="constant")
    assert {lr_at(i, s, peak, total) for i in range(10, total)} == {peak}
    s = _sched(warmup_steps=10, decay_style="inverse-sqrt")
    assert lr_at(39, s, peak, total) == pytest.approx(peak / 2)  # 4x the warmup length: 1/sqrt(4)
    s = _sched(warmup_steps=10, decay_style="wsd", wsd_decay_steps=20, min_lr=0.0)
    values = [lr_at(i, s, peak, total) for i in range(total)]
    assert values[10:90] == [peak] * 80
    assert values[99] == pytest.approx(0.5) and values[109] == pytest.approx(0.0)
    for style in ("cosine", "minus-sqrt", "exponential"):
        s = _sched(decay_style="wsd", wsd_decay_steps=20, wsd_decay_style=style, min_lr=0.01)
        tail = [lr_at(i, s, peak, total) for i in range(89, total)]
        assert all(a >= b for a, b in itertools.pairwise(tail)), style
        assert tail[-1] == pytest.approx(0.01), style
    s = _sched(warmup_fraction=0.5, decay_style="constant")
    assert lr_at(54, s, peak, total) == pytest.approx(peak) and lr_at(26, s, peak, total) == pytest.approx(27 / 55)


def test_weight_decay_schedule_and_param_scheduler_state():
    s = _sched(weight_decay_start=0.0, weight_decay_end=0.2, weight_decay_style="linear", warmup_steps=2)
    assert weight_decay_at(0, s, 0.1, 11) == 0.0 and weight_decay_at(10, s, 0.1, 11) == pytest.approx(0.2)
    assert weight_decay_at(5, s, 0.1, 11) == pytest.approx(0.1)
    cos = dataclasses.replace(s, weight_decay_style="cosine")
    assert weight_decay_at(5, cos, 0.1, 11) == pytest.approx(0.1)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(
        [{"params": [model.weight]}, {"params": [model.bias], "weight_decay": 0.0, "lr_scale": 0.5}], lr=1.0
    )
    sched = ParamScheduler(opt, s, OptimizerConfig(lr=1.0, weight_decay=0.1), total_steps=11)
    for _ in range(6):
        sched.step()
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(weight_decay_at(6, s, 0.1, 11))
    assert opt.param_groups[1]["weight_decay"] == 0.0  # no decay on biases stays so
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * lr_at(6, s, 1.0, 11))
    other = ParamScheduler(opt, s, OptimizerConfig(lr=1.0, weight_decay=0.1), total_steps=11)
    other.load_state_dict(sched.state_dict())
    assert other.lr == sched.lr and other.step_count == 6
    with pytest.raises(ValueError, match="'step' must be a non-negative integer"):
        other.load_state_dict({"step": -1})
    assert math.isfinite(other.weight_decay)
