"""megalith-train with context parallelism: packed documents end to end (cp2 runs equal cp1), checkpoints
independent of cp (save at cp2, load at cp1 and cp4), and configuration errors that name the numbers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from megalith.data import IndexedDatasetWriter
from megalith.training.cli import main
from megalith.training.config_tree import ConfigError, load_config
from megalith.training.data import micro_batches
from megalith.training.run_config import RunConfig
from megalith.training.trainer import Trainer
from tests.harness import run_distributed
from tests.training.loop_common import make_config, train_losses

VOCAB = 50  # NullTokenizer: ids 0..49, EOD 50, pad 51
DOCS = ["data.tokenizer_type=NullTokenizer", f"data.vocab_size={VOCAB}", "data.reset_position_ids=true",
        "data.reset_attention_mask=true", "data.eod_mask_loss=true", "data.split=90,10,0"]  # fmt: skip


def _write_documents(prefix: str) -> None:
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(120):
            length = int(rng.integers(2, 14))  # documents of 2..13 tokens: most samples hold several
            writer.add_document([*rng.integers(0, VOCAB, size=length - 1), VOCAB])


def _documents_run(rank, world, tmp, prefix, cp, comm, documents=True):
    switches = DOCS if documents else [s for s in DOCS if not s.startswith("data.reset_")]
    cfg = make_config(f"{tmp}/cp{cp}-{comm}-{documents}", f"data.blend={prefix}", *switches, f"parallel.cp={cp}",
                      f"parallel.cp_comm={comm}", "training.train_iters=3", "training.eval_interval=3")  # fmt: skip
    losses, trainer = train_losses(cfg)
    evals = [h["eval_loss"] for h in trainer.history if "eval_loss" in h]
    return losses, evals


def test_packed_documents_under_cp2_train_like_cp1(tmp_path):
    """reset_position_ids, reset_attention_mask and eod_mask_loss from the data section reach the model; ring and
    all-gather cp2 runs give the losses of the one-process run."""
    prefix = str(tmp_path / "docs")
    _write_documents(prefix)
    (ref,) = run_distributed(_documents_run, 1, str(tmp_path), prefix, 1, "ring")
    assert len(ref[0]) == 3 and len(ref[1]) == 1
    (across,) = run_distributed(_documents_run, 1, str(tmp_path), prefix, 1, "ring", False)
    assert across[0][0][1] != pytest.approx(ref[0][0][1], rel=1e-4)  # without the switches attention crosses docs
    for comm in ("ring", "allgather"):
        for losses, evals in run_distributed(_documents_run, 2, str(tmp_path), prefix, 2, comm, timeout=600):
            assert [s for s, _ in losses] == [1, 2, 3]
            assert [loss for _, loss in losses] == pytest.approx([loss for _, loss in ref[0]], rel=1e-5), comm
            assert evals == pytest.approx(ref[1], rel=1e-5), comm


def test_micro_batches_carry_positions_and_documents(tmp_path):
    prefix = str(tmp_path / "docs")
    _write_documents(prefix)
    from megalith.training.data import build_datasets, load_tokenizer

    cfg = make_config(str(tmp_path), f"data.blend={prefix}", *DOCS)
    train, _ = build_datasets(cfg.data, train_samples=8, valid_samples=0, vocab_size=VOCAB + 2, seed=1,
                              tokenizer=load_tokenizer(cfg.data))  # fmt: skip
    batch = next(micro_batches(train, consumed_samples=0, total_samples=8, micro_batch_size=2, global_batch_size=2,
                               dp_rank=0, dp=1, position_ids=True, documents=True))  # fmt: skip
    ids, cu = batch["input_ids"], batch["cu_seqlens"]
    flat = ids.flatten().tolist()
    starts = sorted({0, 16, 32} | {i + 1 for i, t in enumerate(flat) if t == VOCAB and (i + 1) % 16})
    assert cu.dtype == torch.int32 and cu.tolist() == starts
    lengths = np.diff(starts).tolist()
    assert batch["position_ids"].flatten().tolist() == [p for n in lengths for p in range(n)]


_RESHARD = ("training.train_iters=2", "schedule.decay_style=constant", "ddp.use_distributed_optimizer=true")


def _fixed_batch(trainer):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, trainer.model_config.vocab_size, (2, 17), generator=g)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def _step_and_eval(trainer):
    before = trainer.evaluate()
    out = trainer.train_step([_fixed_batch(trainer) for _ in range(trainer.num_microbatches)])
    return before, out.loss, trainer.evaluate()


def _save_at_cp2(rank, world, tmp):
    _, trainer = train_losses(make_config(tmp, "parallel.cp=2", *_RESHARD, f"checkpoint.save={tmp}/ck"))
    return _step_and_eval(trainer)  # the unsaved continuation: the reference for the loaded runs


def _load_at(rank, world, tmp, cp):
    cfg = make_config(f"{tmp}/cp{cp}", f"parallel.cp={cp}", *_RESHARD, f"checkpoint.load={tmp}/ck")
    trainer = Trainer(cfg, stream=io.StringIO())
    assert trainer.step == 2 and trainer.dims.cp == cp
    return _step_and_eval(trainer)


def test_checkpoint_from_cp2_loads_at_cp1_and_cp4(tmp_path):
    """Saved at cp2 with ZeRO-1 (optimizer state sharded over the two cp ranks), loaded at cp1 and cp4 (sharded
    over four): the same weights, the same next step."""
    ref_eval, ref_loss, ref_after = run_distributed(_save_at_cp2, 2, str(tmp_path), timeout=600)[0]
    for cp in (1, 4):
        ev, loss, after = run_distributed(_load_at, cp, str(tmp_path), cp, timeout=600)[0]
        assert ev == pytest.approx(ref_eval, rel=1e-5), cp
        assert loss == pytest.approx(ref_loss, rel=1e-5), cp
        assert after == pytest.approx(ref_after, rel=1e-4), cp
        assert after != pytest.approx(ev, rel=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.cp=3", "data.seq_len=16"], r"data.seq_len \(16\) is not divisible by 2 \* parallel.cp = 6"),
        (["parallel.cp=2", "parallel.cp_comm=p2p"], r"cp_comm must be one of ring, allgather, got 'p2p'"),
        (["parallel.cp=2", "runtime.attention_dropout=0.1"], r"attention_dropout \(0.1\) must be 0 under context"),
        (["data.reset_attention_mask=true"], r"data.reset_attention_mask needs documents separated by end-of"),
        (
            ["parallel.cp=2", "parallel.tp=4", "parallel.sequence_parallel=true", "data.seq_len=20"],
            r"data.seq_len \(20\) / parallel.cp \(2\) is not divisible by parallel.tp \(4\) \(sequence_parallel\)",
        ),
    ],
)
def test_configuration_errors_name_the_numbers(overrides, message, capsys):
    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, None, overrides)
    assert main(["--print-config", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "megalith-train: error:" in err
