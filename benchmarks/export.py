"""Export throughput (GB/s) and peak RSS against checkpoint and layer size; prints a table (not a test).

    python benchmarks/export.py --preset llama3-1b     # ~2.5 GB bf16 source per source kind, needs ~12 GB disk
    python benchmarks/export.py --preset small         # seconds

Two random sources of the same model: a training checkpoint written by megalith.core.checkpoint
(`write_model_checkpoint`, read by `ModelCheckpointReader`) and a canonical directory (model.safetensors +
megalith.json). Each target runs in a fresh subprocess twice: the first run gives the peak RSS increase, the
second the time; the baseline row reads every source tensor whole (no conversion, no writing), i.e. the I/O
floor. The exporters read the embedding and output matrices in row blocks (megalith.export.io.ROW_BLOCK_BYTES),
so their peak is set by the largest layer tensor, not by the vocabulary.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from megalith.core.checkpoint import write_model_checkpoint
from megalith.export.io import write_canonical_dir
from megalith.export.mapping import canonical_shape, entries
from megalith.export.spec import ModelSpec

PRESETS = {
    "llama3-1b": dict(family="llama", vocab_size=128256, hidden_size=2048, num_layers=16, num_attention_heads=32,
                      num_kv_heads=8, ffn_hidden_size=8192, max_seq_len=8192, norm="rmsnorm", norm_eps=1e-5,
                      activation="swiglu", position_embedding="rope", rope_base=500000.0, bias=False,
                      tie_embeddings=True, rope_scaling={"factor": 32.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 8192}),
    "small": dict(family="llama", vocab_size=32000, hidden_size=512, num_layers=12, num_attention_heads=8,
                  num_kv_heads=4, ffn_hidden_size=1536, max_seq_len=2048, norm="rmsnorm", norm_eps=1e-5,
                  activation="swiglu", position_embedding="rope", rope_base=10000.0, bias=False,
                  tie_embeddings=False, rope_scaling=None),
}  # fmt: skip

_CHILD = """
import shutil, sys, time, torch
from megalith.export.io import CanonicalDirSource
from megalith.core.checkpoint import ModelCheckpointReader
from megalith.export.hf import export_hf
from megalith.export.trtllm import export_trtllm
def rss(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
target, kind, src, out = sys.argv[1:5]
source = CanonicalDirSource(src) if kind == "canonical" else ModelCheckpointReader(src)
def run():
    if target == "read":
        for name in source.tensor_names():
            source.read(name)
    elif target == "hf":
        export_hf(source, out, dtype=torch.bfloat16, progress=False)
    else:
        export_trtllm(source, out, tp=int(target.split("tp")[1]), dtype=torch.bfloat16, progress=False)
open("/proc/self/clear_refs", "w").write("5")
before = rss("VmRSS:")
run()  # the first run gives the peak memory (later runs reuse memory the allocator kept)
peak = rss("VmHWM:") - before
shutil.rmtree(out, ignore_errors=True)
start = time.perf_counter()
run()  # the second gives the time, without one-time initialisation of torch ops
print(time.perf_counter() - start, peak)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--source", choices=("checkpoint", "canonical", "both"), default="both")
    parser.add_argument("--workdir", help="where to write the sources and outputs (default: a temp dir)")
    args = parser.parse_args()
    cfg = PRESETS[args.preset]
    spec = ModelSpec.from_config(cfg)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="megalith-export-bench-"))
    shapes = {e.canonical: canonical_shape(e, spec) for e in entries(spec)}

    def tensors():
        gen = torch.Generator().manual_seed(0)
        return ((n, torch.randn(s, generator=gen).bfloat16()) for n, s in shapes.items())

    kinds = ("checkpoint", "canonical") if args.source == "both" else (args.source,)
    layer = sum(2 * torch.Size(s).numel() for n, s in shapes.items() if n.startswith("layers.0."))
    largest = max(2 * torch.Size(s).numel() for n, s in shapes.items())
    largest_layer_tensor = max(2 * torch.Size(s).numel() for n, s in shapes.items() if n.startswith("layers.0."))
    print(f"preset {args.preset}: one layer {layer / 1e6:.1f} MB (largest tensor in it "
          f"{largest_layer_tensor / 1e6:.1f} MB), largest tensor {largest / 1e6:.1f} MB (bf16)")  # fmt: skip
    for kind in kinds:
        src = work / f"src-{kind}"
        shutil.rmtree(src, ignore_errors=True)
        if kind == "canonical":
            write_canonical_dir(src, cfg, tensors())
        else:
            write_model_checkpoint(src, cfg, tensors())
        size = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
        print(f"\nsource: {kind} ({size / 1e9:.2f} GB)")
        print(f"{'target':<14}{'seconds':>9}{'GB/s':>8}{'peak RSS +MB':>14}{'x layer':>9}{'x largest':>11}")
        for target in ("read", "hf", "trtllm-tp2"):
            out = work / target
            shutil.rmtree(out, ignore_errors=True)
            result = subprocess.run([sys.executable, "-c", _CHILD, target.replace("trtllm-", ""), kind, str(src),
                                     str(out)], capture_output=True, text=True, check=True)  # fmt: skip
            seconds, peak = (float(x) for x in result.stdout.split())
            rate = size / seconds / 1e9
            print(f"{target:<14}{seconds:>9.2f}{rate:>8.2f}{peak / 1e6:>14.1f}{peak / layer:>9.2f}"
                  f"{peak / largest:>11.2f}")  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
