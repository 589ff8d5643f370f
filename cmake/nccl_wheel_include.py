"""Prints the include directory of the installed nvidia-nccl-cu13/-cu12 wheel (for cmake/MegalithNccl.cmake)."""

import importlib.metadata as metadata
import sys

for name in ("nvidia-nccl-cu13", "nvidia-nccl-cu12"):
    try:
        files = metadata.distribution(name).files or []
    except metadata.PackageNotFoundError:
        continue
    for file in files:
        if str(file).replace("\\", "/").endswith("include/nccl.h"):
            print(file.locate().parent)
            sys.exit(0)
sys.exit(1)
