"""Memory visibility: per-rank peaks in metrics.jsonl and on the console, and out-of-memory as a one-line error.

No GPU is needed: the gathering runs on gloo with each process's resident-set peak, and out-of-memory is injected
as the exception torch raises (torch.cuda.OutOfMemoryError) from inside a step or the model's construction.
"""

from __future__ import annotations

import io
import json

import pytest
import torch

from megalith.training import cli
from megalith.training.memory import (
    format_memory_per_rank,
    local_peak_memory,
    memory_metrics,
    out_of_memory_message,
)
from megalith.training.trainer import Trainer
from tests.harness import run_distributed
from tests.training.loop_common import BASE, layout, make_config

TORCH_OOM = (
    "CUDA out of memory. Tried to allocate 2.50 GiB. GPU 3 has a total capacity of 79.11 GiB of which 1.20 GiB "
    "is free. Of the allocated memory 74.02 GiB is allocated by PyTorch"
)


def test_memory_metrics_and_the_per_rank_line():
    metrics = memory_metrics([1.5, 3.25], [2.0, 4.0], cuda=True)
    assert metrics == {
        "mem_gib": 3.25,
        "mem_reserved_gib": 4.0,
        "mem_gib_per_rank": [1.5, 3.25],
        "mem_reserved_gib_per_rank": [2.0, 4.0],
    }
    assert memory_metrics([0.5], [0.5], cuda=False) == {"mem_gib": 0.5}
    line = format_memory_per_rank([1.5, 3.25], [2.0, 4.0], cuda=True)
    assert line == "peak memory per rank, GiB allocated/reserved: r0 1.50/2.00 | r1 3.25/4.00"
    assert format_memory_per_rank([0.5, 0.75], [0.5, 0.75], cuda=False).endswith("resident: r0 0.50 | r1 0.75")
    allocated, reserved = local_peak_memory()
    assert allocated == reserved > 0  # a CPU process: its peak resident set


def _train_two_ranks(rank, world_size, tmp):
    out = io.StringIO()
    trainer = Trainer(make_config(tmp, *layout(1, 1), "training.train_iters=3"), stream=out)
    trainer.fit()
    trainer.close()
    return out.getvalue(), local_peak_memory()[0]


def test_every_rank_s_peak_reaches_metrics_and_console(tmp_path):
    results = run_distributed(_train_two_ranks, 2, str(tmp_path), init=False)
    console, own_peaks = results[0][0], [peak for _, peak in results]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    per_rank = records[-1]["mem_gib_per_rank"]
    assert len(per_rank) == 2 and all(0 < peak <= own for peak, own in zip(per_rank, own_peaks, strict=True))
    assert records[-1]["mem_gib"] == max(per_rank)
    assert "peak memory per rank, GiB resident: r0 " in console and " | r1 " in console
    assert f"mem {records[0]['mem_gib']:.2f} GiB" in console


def _raise_oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError(TORCH_OOM)


def _run_cli(tmp_path, capsys, *overrides) -> tuple[int, str]:
    code = cli.main([*BASE, f"logging.run_dir={tmp_path}/run", *overrides])
    return code, capsys.readouterr().err


def test_out_of_memory_in_a_step_is_one_line_naming_layout_and_knobs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Trainer, "forward_backward", _raise_oom)
    code, err = _run_cli(tmp_path, capsys)
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err == (
        "megalith-train: error: out of memory in training step 1 on rank 0 (cpu); layout tp 1 x pp 1 x dp 1, "
        "micro-batch 2 x seq 16, fp32, recompute none, ZeRO-1 off; asked for 2.50 GiB more; to fit, try a smaller "
        "training.micro_batch_size (e.g. 1; raise the micro-batches per step instead), runtime.recompute=selective "
        "(or full), a larger parallel.tp (now 1) or parallel.pp (now 1), ddp.use_distributed_optimizer=true with "
        "more data-parallel ranks (ZeRO-1), precision.dtype=bf16\n"
    )


def test_out_of_memory_while_building_is_reported_too(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Trainer, "_build_model", _raise_oom)
    code, err = _run_cli(tmp_path, capsys, "runtime.recompute=full", "training.micro_batch_size=1")
    assert code == 1
    assert err.startswith("megalith-train: error: out of memory while building the model and optimizer on rank 0")
    assert "micro-batch 1 x seq 16, fp32, recompute full," in err
    assert "micro_batch_size" not in err and "runtime.recompute" not in err  # nothing left to lower there


def test_knobs_already_at_their_limit_are_not_suggested():
    layout_ = {"tp": 2, "pp": 4, "virtual_stages": 2, "dp": 8, "micro_batch_size": 1, "seq_len": 8192,
               "precision": "bf16", "recompute": "full", "distributed_optimizer": True, "compile": True}  # fmt: skip
    message = out_of_memory_message(
        torch.cuda.OutOfMemoryError("out of memory"), where="in step 9", rank=5, device=torch.device("cpu"),
        layout=layout_,
    )  # fmt: skip
    assert message == (
        "out of memory in step 9 on rank 5 (cpu); layout tp 2 x pp 4 (x2 virtual) x dp 8, micro-batch 1 x seq 8192, "
        "bf16, recompute full, ZeRO-1 on, compiled blocks; to fit, try a larger parallel.tp (now 2) or parallel.pp "
        "(now 4)"
    )


@pytest.mark.parametrize("dp", [1, 2])
def test_zero1_is_suggested_by_data_parallel_degree(dp):
    layout_ = {"tp": 1, "pp": 1, "virtual_stages": 1, "dp": dp, "micro_batch_size": 1, "seq_len": 16,
               "precision": "bf16", "recompute": "full", "distributed_optimizer": False, "compile": False}  # fmt: skip
    message = out_of_memory_message(
        RuntimeError(""), where="in step 1", rank=0, device=torch.device("cpu"), layout=layout_
    )
    expected = "(ZeRO-1: optimizer state sharded over dp)" if dp > 1 else "with more data-parallel ranks (ZeRO-1)"
    assert message.endswith(expected)
