"""`python -m megalith.kernels`: how the compiled module was built, what the CPU kernels run with, whether CUDA
can run now, which NCCL loads."""

from __future__ import annotations

import megalith.kernels as kernels
from megalith.kernels import nccl


def main() -> None:
    info = kernels.build_info()
    print(f"megalith-kernels {info['version']} ({info['build_type']}, {info['compiler']}, C++{info['cxx_standard']})")
    if info["cuda"]:
        archs = ", ".join(f"sm_{arch}" for arch in info["cuda_archs"])
        print(f"CUDA compiled in: yes ({info['cuda_compiler']}, runtime {info['cuda_runtime']}, archs {archs})")
    else:
        print("CUDA compiled in: no (CPU kernels only)")
    compiled = [isa for isa in ("base", "avx2", "avx512") if kernels._C.kernels.cpu_isa_available(isa)]
    print(f"CPU kernels: {kernels._C.kernels.cpu_isa()} instruction set (usable here: {', '.join(compiled)})")
    if kernels.cuda_available():
        print("CUDA available now: yes")
    else:
        print(f"CUDA available now: no ({kernels.cuda_unavailable_reason()})")
    for line in _nccl_report():
        print(line)


def _nccl_report() -> list[str]:
    """The NCCL library the communicator would load (it works without a GPU) and whether it is compiled in."""
    compiled = "yes" if nccl.has_communicator() else "no (CPU-only build)"
    try:
        info = nccl.library_info()
    except nccl.NcclLibraryError as exc:
        return [f"NCCL library: not found ({exc})", f"NCCL communicator compiled in: {compiled}"]
    version = ".".join(str(part) for part in info["version"])
    source = {"wheel": f"the {info['wheel'] or 'nvidia-nccl'} wheel", "system": "the system library path"}.get(
        info["source"], info["source"]
    )
    minimum = ".".join(str(part) for part in nccl.MIN_VERSION)
    return [
        f"NCCL library: {version} at {info['path']} (from {source}; minimum {minimum})",
        f"NCCL communicator compiled in: {compiled}",
    ]


if __name__ == "__main__":
    main()
