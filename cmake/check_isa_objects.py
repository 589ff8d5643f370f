"""Build check: no function of an AVX2/AVX-512 kernel object outside its instruction-set namespace uses AVX.

Inline functions of shared headers (the standard library, megalith/error.h) are emitted as weak copies in every
object that uses them, and the linker keeps one of them for the whole module. If such a copy were compiled for
AVX-512 it could replace the baseline one and crash CPUs without it, so cpu_common.h compiles only the
kernels' own code for the wider instruction set. This script disassembles the objects and fails the build
when that rule was broken (for instance by an #include placed after cpu_common.h).

    python check_isa_objects.py OBJDUMP OBJECT...
"""

from __future__ import annotations

import re
import subprocess
import sys

_FUNCTION = re.compile(r"^[0-9a-f]+ <(.*)>:$")
_VECTOR = re.compile(r"^\s+[0-9a-f]+:\s+v[a-z0-9]+\s|%[yz]mm|%k[1-7]")  # VEX/EVEX mnemonics or registers


def offenders(objdump: str, path: str) -> set[str]:
    text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", path], check=True, capture_output=True,
                          text=True).stdout  # fmt: skip
    found, name = set(), ""
    for line in text.splitlines():
        match = _FUNCTION.match(line)
        if match:
            name = match.group(1)
        elif _VECTOR.search(line) and "::avx2::" not in name and "::avx512::" not in name:
            found.add(name)
    return found


def main() -> int:
    objdump, paths = sys.argv[1], sys.argv[2:]
    bad = {(path, name) for path in paths for name in offenders(objdump, path)}
    for path, name in sorted(bad):
        print(f"error: {path}: {name} is shared code compiled with AVX instructions", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
