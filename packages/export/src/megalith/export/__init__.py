"""megalith.export: see packages/export/README.md."""

from __future__ import annotations

from importlib import metadata as _metadata

from megalith.export.hf import HFModelSource, export_hf
from megalith.export.io import CanonicalDirSource, ModelSource, open_source, write_canonical_dir
from megalith.export.spec import ConversionError, model_config_from_dict
from megalith.export.trtllm import export_trtllm
from megalith.export.verify import verify_dir

__version__ = _metadata.version("megalith-export")

__all__ = [
    "CanonicalDirSource",
    "ConversionError",
    "HFModelSource",
    "ModelSource",
    "export_hf",
    "export_trtllm",
    "model_config_from_dict",
    "open_source",
    "verify_dir",
    "write_canonical_dir",
]
