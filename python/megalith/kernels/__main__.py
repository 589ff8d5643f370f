"""`python -m megalith.kernels`: print how the compiled module was built and whether CUDA can run now."""

from __future__ import annotations

import megalith.kernels as kernels


def main() -> None:
    info = kernels.build_info()
    print(f"megalith-kernels {info['version']} ({info['build_type']}, {info['compiler']}, C++{info['cxx_standard']})")
    if info["cuda"]:
        archs = ", ".join(f"sm_{arch}" for arch in info["cuda_archs"])
        print(f"CUDA compiled in: yes ({info['cuda_compiler']}, runtime {info['cuda_runtime']}, archs {archs})")
    else:
        print("CUDA compiled in: no (CPU kernels only)")
    if kernels.cuda_available():
        print("CUDA available now: yes")
    else:
        print(f"CUDA available now: no ({kernels.cuda_unavailable_reason()})")


if __name__ == "__main__":
    main()
