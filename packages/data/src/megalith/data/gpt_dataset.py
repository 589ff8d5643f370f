"""GPTDataset: fixed-length training samples cut from an indexed dataset, with Megatron-LM's index semantics.

Three indices select the samples (packages/data/README.md, "GPT samples"): the document index (the split's
sequence ids tiled over epochs and shuffled), the sample index (where each sample starts, built in C++) and the
shuffle index (the order samples are served in). One seeded `numpy.random.RandomState` draws them in
Megatron-LM's order, so the same corpus, seed and sequence length give the same samples in the same order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from megalith.data.cache import IndexCache
from megalith.data.indexed import IndexedDataset
from megalith.data.indexing import build_sample_index

__all__ = ["SPLIT_NAMES", "GPTDataset", "GPTDatasetConfig", "build_gpt_indices"]

SPLIT_NAMES = ("train", "valid", "test")
_INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")
# Bump when the index algorithm changes, so stale caches are never reused.
_CACHE_FORMAT = 1


@dataclass(frozen=True, kw_only=True)
class GPTDatasetConfig:
    """How samples are cut and what an item holds."""

    seq_length: int
    """Tokens per sample (inputs); each sample reads seq_length + 1 tokens when add_extra_token."""
    seed: int = 1234
    """Seed of the RandomState that shuffles documents and samples."""
    eod: int | None = None
    """End-of-document id; needed by eod_mask_loss and reset_position_ids."""
    pad: int = 0
    """Id that fills the short final sample (its loss is always masked)."""
    eod_mask_loss: bool = False
    """Mask the loss at positions whose input is EOD (do not predict across documents)."""
    reset_position_ids: bool = False
    """Restart position ids at 0 after every EOD."""
    reset_attention_mask: bool = False
    """Add `cu_seqlens` to every item: the documents of the sample (a new one starts after every EOD), so that
    attention can be kept inside each document (Megatron-LM's reset_attention_mask, without an S x S mask)."""
    add_extra_token: bool = True
    """Read one token more than seq_length per sample so labels are the shifted inputs."""
    drop_last_partial_validation: bool = True
    """For the valid split: drop the last, partial sample (train and test always drop it)."""
    cache_dir: str | None = None
    """Where index caches go; default `<dataset prefix>/cache/GPTDataset_indices`."""
    tokenizer: str = ""
    """Tokenizer identifier, recorded in the cache description."""

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise ValueError(f"seq_length must be positive, got {self.seq_length}")
        if (self.eod_mask_loss or self.reset_position_ids or self.reset_attention_mask) and self.eod is None:
            raise ValueError("eod_mask_loss, reset_position_ids and reset_attention_mask need the eod id (eod=None)")


def num_epochs_for(tokens_per_epoch: int, num_samples: int | None, seq_length: int, extra: int) -> int:
    """Smallest E with E * tokens_per_epoch >= num_samples * seq_length + extra (1 when num_samples is None)."""
    if num_samples is None:
        return 1
    if tokens_per_epoch <= 0:
        raise ValueError(f"the split holds no tokens but {num_samples} samples were requested")
    needed = num_samples * seq_length + extra
    return max(1, -(-needed // tokens_per_epoch))


def _document_index(ids: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_last: bool) -> np.ndarray:
    if separate_last and num_epochs > 1:
        first = _document_index(ids, num_epochs - 1, rng, False)
        last = _document_index(ids, 1, rng, False)
        return np.concatenate([first, last])
    index = np.tile(ids.astype(np.int32), num_epochs)
    rng.shuffle(index)
    return index


def _shuffle_index(num_first: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.int64 if total >= np.iinfo(np.uint32).max - 1 else np.uint32
    first = np.arange(num_first, dtype=dtype)
    rng.shuffle(first)
    if num_first == total:
        return first
    last = np.arange(num_first, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


def build_gpt_indices(
    sequence_lengths: np.ndarray,
    ids: np.ndarray,
    num_samples: int | None,
    seq_length: int,
    seed: int,
    add_extra_token: bool = True,
    drop_last_partial: bool = True,
) -> dict[str, np.ndarray]:
    """The document, sample and shuffle indices of a GPT dataset over sequence ids `ids`."""
    extra = int(add_extra_token)
    ids = np.asarray(ids, dtype=np.int32)
    tokens_per_epoch = int(np.asarray(sequence_lengths)[ids].sum(dtype=np.int64))
    num_epochs = num_epochs_for(tokens_per_epoch, num_samples, seq_length, extra)
    separate_last = False
    samples_before_last = 0
    if num_epochs > 1:
        samples_before_last = ((num_epochs - 1) * tokens_per_epoch - extra) // seq_length
        from_last = num_samples - samples_before_last
        per_epoch = (tokens_per_epoch - extra) // seq_length
        # A final epoch used for less than 80% of its samples is shuffled on its own, so the samples it does
        # contribute are a uniform draw from it rather than whatever documents a joint shuffle put early.
        separate_last = from_last < int(0.80 * per_epoch)
    rng = np.random.RandomState(seed)
    document_index = _document_index(ids, num_epochs, rng, separate_last)
    sample_index = build_sample_index(
        sequence_lengths, document_index, seq_length, num_epochs, tokens_per_epoch, drop_last_partial, add_extra_token
    )
    total = sample_index.shape[0] - 1
    shuffle_index = _shuffle_index(samples_before_last if separate_last else total, total, rng)
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


class GPTDataset:
    """Samples of `seq_length` tokens from an IndexedDataset split.

    `ds[i]` is a dict of numpy arrays: `input_ids` (also under `tokens`) int64[S], `labels` int64[S] (-100
    where the loss is masked), `loss_mask` float32[S], `position_ids` int64[S], and with reset_attention_mask
    `cu_seqlens` int32[S + 1]: where each document of the sample starts (0 first; a document starts after each
    EOD input), then S, padded by repeating S so that items stack.

    Args:
        dataset: the IndexedDataset (or its prefix).
        ids: sequence ids of this split (default: all sequences).
        num_samples: samples wanted (epochs are added until there are enough); None = one epoch.
        config: GPTDatasetConfig.
        split: "train", "valid" or "test" (names the cache and picks the drop-last rule).
    """

    def __init__(
        self, dataset, ids=None, num_samples: int | None = None, *, config: GPTDatasetConfig, split: str = "train"
    ) -> None:
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
        self.dataset = dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(dataset)
        self.config = config
        self.split = split
        self.ids = np.arange(len(self.dataset), dtype=np.int32) if ids is None else np.asarray(ids, np.int32)
        self.num_samples = num_samples
        drop_last = config.drop_last_partial_validation if split == "valid" else True
        lengths = self.dataset.sequence_lengths
        tokens = int(lengths[self.ids].sum(dtype=np.int64)) if len(self.ids) else 0
        description = {
            "class": "GPTDataset",
            "format": _CACHE_FORMAT,
            "dataset_path": os.path.abspath(self.dataset.prefix),
            # The data itself, so a dataset rewritten in place never reuses the indices of the old one.
            "dataset_index": self.dataset.content_key,
            "dataset_sequences": len(self.dataset),
            "split_sequences": [int(self.ids[0]), int(self.ids[-1]) + 1, len(self.ids)] if len(self.ids) else [],
            "split_tokens": tokens,
            "num_samples": num_samples,
            "index_split": split,
            "random_seed": config.seed,
            "sequence_length": config.seq_length,
            "add_extra_token": config.add_extra_token,
            "drop_last_partial": drop_last,
            "tokenizer": config.tokenizer,
        }
        cache_dir = config.cache_dir or os.path.join(self.dataset.prefix, "cache", "GPTDataset_indices")
        self.cache = IndexCache(cache_dir, "GPTDataset", split, description, _INDEX_NAMES)
        arrays = self.cache.load_or_build(
            lambda: build_gpt_indices(
                lengths, self.ids, num_samples, config.seq_length, config.seed, config.add_extra_token, drop_last
            )
        )
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def __getstate__(self) -> dict:
        # Data-loader workers re-open the cached .npy files with mmap instead of receiving copies of the indices.
        state = dict(self.__dict__)
        if self.cache.complete():
            for name in _INDEX_NAMES:
                state.pop(name)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "sample_index" not in state:
            if not self.cache.complete():
                raise FileNotFoundError(f"the index cache {self.cache.directory / self.cache.base}-* disappeared")
            arrays = self.cache.load_or_build(None)
            for name in _INDEX_NAMES:
                setattr(self, name, arrays[name])

    def sample_tokens(self, j: int) -> tuple[np.ndarray, int]:
        """Tokens of sample j (unshuffled order) as int64, right-padded; also how many are real (not pad)."""
        extra = int(self.config.add_extra_token)
        want = self.config.seq_length + extra
        beg_pos, beg_off = (int(v) for v in self.sample_index[j])
        end_pos, end_off = (int(v) for v in self.sample_index[j + 1])
        if beg_pos == end_pos:
            parts = [self.dataset.get(self.document_index[beg_pos], beg_off, end_off - beg_off + extra)]
        else:
            parts = [self.dataset.get(self.document_index[beg_pos], beg_off)]
            parts += [self.dataset[int(self.document_index[p])] for p in range(beg_pos + 1, end_pos)]
            parts.append(self.dataset.get(self.document_index[end_pos], 0, end_off + extra))
        real = sum(len(p) for p in parts)
        out = np.full(want, self.config.pad, np.int64)
        np.concatenate(parts, out=out[:real])
        return out, real

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} is out of range for a GPTDataset of {len(self)} samples")
        text, real = self.sample_tokens(int(self.shuffle_index[i]))
        cfg = self.config
        seq = cfg.seq_length
        if cfg.add_extra_token:
            tokens, labels = text[:-1].copy(), text[1:].copy()
            label_real = real - 1
        else:
            tokens, labels = text, np.roll(text, -1)
            labels[-1] = cfg.pad
            label_real = real - 1  # the last position has no next token
        loss_mask = np.ones(seq, np.float32)
        loss_mask[max(label_real, 0) :] = 0.0
        if cfg.eod_mask_loss:
            loss_mask[tokens == cfg.eod] = 0.0
        position_ids = np.arange(seq, dtype=np.int64)
        # A document starts right after each EOD input (one in the last position starts nothing here).
        starts = np.flatnonzero(tokens[:-1] == cfg.eod) + 1 if cfg.eod is not None else np.zeros(0, np.int64)
        if cfg.reset_position_ids:
            # Each position's distance from the most recent document start restarts the count.
            after_eod = np.zeros(seq, np.int64)
            after_eod[starts] = starts
            position_ids -= np.maximum.accumulate(after_eod)
        labels[loss_mask == 0.0] = -100
        item = {
            "input_ids": tokens,
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": position_ids,
        }
        if cfg.reset_attention_mask:
            bounds = np.full(seq + 1, seq, np.int32)
            bounds[0] = 0
            bounds[1 : 1 + len(starts)] = starts
            item["cu_seqlens"] = bounds
        return item
