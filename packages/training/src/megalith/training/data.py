"""Training and validation batches for a run: datasets from the data section, per-rank resumable loaders.

Every rank of a data-parallel replica (all tp, cp and pp ranks) reads the same micro-batches of full sequences
(the pipeline schedule cuts them for context parallelism); the sampler shards global batches over dp and
restarts from the checkpoint's consumed-sample count, so a resumed run sees exactly the batches the
uninterrupted one would have seen. Packed documents travel as `position_ids` and `cu_seqlens` entries.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from megalith.core.models.packing import join_row_bounds
from megalith.data import GPTDatasetConfig, PretrainingSampler, build_gpt_datasets, check_vocabulary, collate
from megalith.training.run_config import DataConfig

__all__ = ["SyntheticDataset", "build_datasets", "load_tokenizer", "micro_batches", "samples_needed"]


class SyntheticDataset:
    """Deterministic, learnable token sequences: sample i is an arithmetic progression mod the vocabulary.

    Start and stride come from a RandomState seeded by (seed, i), so any sample is produced on demand with no
    files, and the next token is predictable from the previous two (the loss falls quickly).
    """

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int) -> None:
        self.num_samples, self.seq_len, self.vocab_size, self.seed = num_samples, seq_len, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"synthetic sample {i} out of range [0, {self.num_samples})")
        rng = np.random.RandomState((self.seed * 1_000_003 + i) % 2**32)
        start, stride = rng.randint(self.vocab_size), rng.randint(1, 8)
        tokens = (start + stride * np.arange(self.seq_len + 1, dtype=np.int64)) % self.vocab_size
        return {
            "input_ids": tokens[:-1],
            "labels": tokens[1:],
            "loss_mask": np.ones(self.seq_len, dtype=np.float32),
            "position_ids": np.arange(self.seq_len, dtype=np.int64),
        }


def load_tokenizer(data: DataConfig):
    """The tokenizer the data section names, or None."""
    if data.tokenizer_type is None:
        return None
    from megalith.data.tokenizers import build_tokenizer

    return build_tokenizer(data.tokenizer_type, data.tokenizer_model, vocab_size=data.vocab_size)


def build_datasets(
    data: DataConfig, *, train_samples: int, valid_samples: int, vocab_size: int, seed: int, tokenizer=None
) -> tuple[Any, Any]:
    """(train, valid) datasets; valid is None when there is no validation data."""
    if data.use_synthetic:
        # A different seed for validation so it measures generalisation over start/stride pairs.
        return (
            SyntheticDataset(train_samples, data.seq_len, vocab_size, seed),
            SyntheticDataset(max(valid_samples, 1), data.seq_len, vocab_size, seed + 1),
        )
    eod = getattr(tokenizer, "eod", None)
    pad = getattr(tokenizer, "pad", None)
    config = GPTDatasetConfig(
        seq_length=data.seq_len,
        seed=seed,
        eod=eod,
        pad=0 if pad is None else pad,
        eod_mask_loss=data.eod_mask_loss,
        reset_position_ids=data.reset_position_ids,
        reset_attention_mask=data.reset_attention_mask,
        cache_dir=data.cache_dir,
        tokenizer=f"{data.tokenizer_type}:{data.tokenizer_model}",
    )
    if data.blend is not None:
        train, valid, _ = build_gpt_datasets(data.blend, data.split, (train_samples, valid_samples, None), config)
    else:
        (train, _, _) = build_gpt_datasets(data.train_blend, "1", (train_samples, None, None), config)
        valid = None
        if data.valid_blend is not None:
            (valid, _, _) = build_gpt_datasets(data.valid_blend, "1", (valid_samples, None, None), config)
    for blend in (data.blend, data.train_blend, data.valid_blend):
        if blend is not None:  # an id past the embedding table would fail mid-run, far from its cause
            check_vocabulary(blend, vocab_size, cache_dir=data.cache_dir)
    if train is None:
        raise ValueError(f"data.split {data.split!r} leaves no training samples")
    if len(train) < train_samples:
        raise ValueError(f"the training data gives {len(train)} samples, the run needs {train_samples}")
    return train, valid


def micro_batches(
    dataset,
    *,
    consumed_samples: int,
    total_samples: int,
    micro_batch_size: int,
    global_batch_size: int,
    dp_rank: int,
    dp: int,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    position_ids: bool = False,
    documents: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches from `consumed_samples` on: input_ids and labels (int64 [B, S] on `device`),
    with `position_ids` the samples' positions (int64 [B, S]), with `documents` their `cu_seqlens` (int32, the
    documents of the whole micro-batch, `megalith.core.models.packing`)."""
    total = min(total_samples, (len(dataset) // global_batch_size) * global_batch_size)
    sampler = PretrainingSampler(total, consumed_samples, micro_batch_size, global_batch_size, dp_rank, dp)
    if num_workers > 0:
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate, persistent_workers=False
        )
    else:
        loader = (collate([dataset[i] for i in indices]) for indices in sampler)
    for batch in loader:
        out = {
            key: torch.as_tensor(np.asarray(batch[key]), dtype=torch.long).to(device) for key in ("input_ids", "labels")
        }
        if position_ids:
            out["position_ids"] = torch.as_tensor(np.asarray(batch["position_ids"]), dtype=torch.long).to(device)
        if documents:
            bounds = torch.as_tensor(np.asarray(batch["cu_seqlens"]), dtype=torch.int32)
            out["cu_seqlens"] = join_row_bounds(bounds, out["input_ids"].shape[1]).to(device)
        yield out


def samples_needed(total_steps: int, global_batch_size: int, eval_iters: int) -> tuple[int, int]:
    """(train, valid) sample counts a run of `total_steps` asks the datasets for (every evaluation reads the
    same first `eval_iters` global batches of the validation data)."""
    return total_steps * global_batch_size, eval_iters * global_batch_size
