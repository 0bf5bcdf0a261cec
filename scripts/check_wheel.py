#!/usr/bin/env python3
"""Checks the compiled module of a wheel (or a bare .so) before release.

1. It loads on the target glibc: every undefined dynamic symbol either carries a version
   that the target glibc has, or is one that the importing process provides (the Python
   C API, and OpenMP from the libgomp that torch loads). An unversioned undefined symbol
   other than those is one that the link stubs lacked (a glibc function newer than the
   target, taken from this machine's headers or static libraries): the module would fail
   to load there with "undefined symbol". auditwheel cannot see these, since it judges
   versioned references only. No DT_NEEDED on libgomp (CMakeLists.txt says why).
2. Its GPU code: the cubins (sm_XY, with the a/f suffix of arch-specific builds) and PTX
   (compute_XY) embedded in the CUDA fat binary, read from the ELF section .nv_fatbin
   (cuobjdump is not part of a compile-only toolkit). --cuda lists the targets that must
   be there.

Usage: check_wheel.py [--glibc 2.28] [--cuda sm_80,sm_90a,compute_80] FILE.whl|FILE.so ...
Needs pyelftools (an auditwheel dependency). Exit status 1 on any problem.
"""

from __future__ import annotations

import argparse
import re
import struct
import sys
import tempfile
import zipfile
from pathlib import Path

from elftools.elf.elffile import ELFFile

# Provided at run time by the process, not by a DT_NEEDED library.
PROCESS_SYMBOLS = re.compile(r"^(_?Py|GOMP_|omp_)")
GLIBC_VERSION = re.compile(r"^GLIBC_(\d+)\.(\d+)(?:\.(\d+))?$")

FATBIN_MAGIC = 0xBA55ED50
# Entry flags of the fat binary (measured with nvcc 13.0: sm_90a sets 0x100000,
# sm_100f sets 0x200000).
FLAG_ARCH_SPECIFIC, FLAG_FAMILY = 0x100000, 0x200000


def check_symbols(elf: ELFFile, name: str, glibc: tuple[int, int]) -> list[str]:
    problems = []
    needed = [t.needed for t in elf.get_section_by_name(".dynamic").iter_tags()
              if t.entry.d_tag == "DT_NEEDED"]
    print(f"{name}: NEEDED {', '.join(needed)}")
    for lib in needed:
        if lib.startswith("libgomp"):
            problems.append(f"{name}: DT_NEEDED {lib} (OpenMP must come from torch's "
                            f"runtime, see CMakeLists.txt)")
    versions = {}
    verneed = elf.get_section_by_name(".gnu.version_r")
    if verneed is not None:
        for entry, aux_iter in verneed.iter_versions():
            for aux in aux_iter:
                versions[aux.entry.vna_other] = (entry.name, aux.name)
    versym = elf.get_section_by_name(".gnu.version")
    for i, sym in enumerate(elf.get_section_by_name(".dynsym").iter_symbols()):
        if not sym.name or sym.entry.st_shndx != "SHN_UNDEF":
            continue
        ndx = versym.get_symbol(i).entry.ndx if versym is not None else "VER_NDX_GLOBAL"
        if isinstance(ndx, int) and ndx in versions:
            lib, ver = versions[ndx]
            m = GLIBC_VERSION.match(ver)
            if m and (int(m[1]), int(m[2])) > glibc:
                problems.append(f"{name}: {sym.name}@{ver} ({lib}) is newer than glibc "
                                f"{glibc[0]}.{glibc[1]}")
            continue
        if sym.entry.st_info.bind == "STB_WEAK" or PROCESS_SYMBOLS.match(sym.name):
            continue
        problems.append(f"{name}: {sym.name} is undefined and unversioned (not in the glibc "
                        f"{glibc[0]}.{glibc[1]} link stubs): it would not resolve there")
    return problems


def cuda_targets(elf: ELFFile) -> set[str]:
    """{'sm_80', 'sm_90a', 'compute_80', ...} from the .nv_fatbin section (empty: no CUDA)."""
    sec = elf.get_section_by_name(".nv_fatbin")
    if sec is None:
        return set()
    data, found, off = sec.data(), set(), 0
    while off + 16 <= len(data):
        magic, _, header, size = struct.unpack_from("<IHHQ", data, off)
        if magic != FATBIN_MAGIC:   # fat binaries are 8-byte aligned in the section
            off += 8
            continue
        p, end = off + header, off + header + size
        while p < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHII", data, p)
            sm = struct.unpack_from("<I", data, p + 28)[0]
            flags = struct.unpack_from("<Q", data, p + 40)[0]
            suffix = "a" if flags & FLAG_ARCH_SPECIFIC else "f" if flags & FLAG_FAMILY else ""
            found.add(f"{'compute' if kind == 1 else 'sm'}_{sm}{suffix}")
            p += entry_header + payload
        off = end
    return found


def check(path: Path, name: str, glibc: tuple[int, int], cuda: set[str]) -> list[str]:
    with path.open("rb") as f:
        elf = ELFFile(f)
        problems = check_symbols(elf, name, glibc)
        targets = cuda_targets(elf)
    order = sorted(targets, key=lambda t: (t.startswith("compute"), int(re.sub(r"\D", "", t))))
    print(f"{name}: CUDA targets: {' '.join(order) if order else 'none (built without CUDA)'}")
    if cuda - targets:
        problems.append(f"{name}: CUDA targets missing: {' '.join(sorted(cuda - targets))}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--glibc", default="2.28", help="oldest glibc to load on (default 2.28)")
    ap.add_argument("--cuda", default="", help="comma-separated targets that must be embedded")
    ap.add_argument("files", nargs="+", type=Path)
    args = ap.parse_args()
    glibc = tuple(int(x) for x in args.glibc.split("."))[:2]
    cuda = {t for t in args.cuda.split(",") if t}
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for f in args.files:
            if f.suffix != ".whl":
                problems += check(f, f.name, glibc, cuda)
                continue
            with zipfile.ZipFile(f) as z:
                sos = [n for n in z.namelist() if n.endswith(".so") or ".so." in n]
                if not sos:
                    problems.append(f"{f.name}: no compiled module in the wheel")
                for n in sos:
                    problems += check(Path(z.extract(n, tmp)), n, glibc, cuda)
    for p in problems:
        print("error:", p, file=sys.stderr)
    if not problems:
        print(f"ok: every undefined symbol resolves on glibc >= {args.glibc}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
