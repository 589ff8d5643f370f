"""End-to-end demo on embedded data (grows with the project; see README)."""

from __future__ import annotations

import numpy as np

import megalith.kernels as kernels
from megalith.data import build_blending_index, build_sample_index


def main() -> None:
    info = kernels.build_info()
    print(f"megalith-kernels {info['version']}: CUDA compiled in={info['cuda']} archs={info['cuda_archs']}")
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 2000, size=100_000).astype(np.int32)
    order = rng.permutation(len(sizes)).astype(np.int32)
    index = build_sample_index(sizes, order, 2048, 1, int(sizes.sum()))
    print(f"sample index: {len(index) - 1} samples of 2048+1 tokens from {len(sizes)} documents")
    dataset_index, _ = build_blending_index([0.25, 0.75], 1_000_000)
    print(f"blend of 1M samples: {np.bincount(dataset_index).tolist()} per dataset (weights 0.25/0.75)")


if __name__ == "__main__":
    main()
