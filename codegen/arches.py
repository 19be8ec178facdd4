"""The target architectures: where their headers live and what their C ABI is.

Every arch the project knows is one row here; the rest of the pipeline takes
an Arch and never tests an arch name itself.
"""

from __future__ import annotations

import platform
import re
import shutil
from dataclasses import dataclass

from .errors import GeneratorError

# LP64 sizes shared by every arch we target; alignments equal sizes.
LP64_SIZES = {
    "char": 1, "short": 2, "int": 4, "long": 8, "long long": 8,
    "pointer": 8, "__int128": 16, "_Bool": 1,
}


@dataclass(frozen=True)
class Arch:
    name: str                 # our name, also the generated module's name
    header_dir: str           # folder name for this arch's asm/ in headers/<version>/
    multiarch: str            # Debian multiarch triplet, for --include-dir /usr/include
    machines: tuple[str, ...]  # platform.machine() values of a host of this arch
    cross_compilers: tuple[str, ...]  # compilers to use when the host is another arch
    char_signed: bool
    # ziglang wheels' folders for this arch's asm/, newest name first (zig renamed them in 0.9/0.10)
    zig_dirs: tuple[str, ...] = ()
    kvm_since: tuple[int, int] = (0, 0)   # the first kernel whose uapi has asm/kvm.h for this arch
    byteorder: str = "little"
    # uapi headers beyond linux/kvm.h whose types and constants this arch's module also
    # carries (x86: the boot protocol a loader fills in); a header set that lacks one, or
    # something it includes, leaves it out and says why
    extra_headers: tuple[str, ...] = ()

    def has_kvm(self, version: str) -> bool:
        """Whether kernel `version` has KVM (an asm/kvm.h) on this arch."""
        return tuple(int(x) for x in re.findall(r"\d+", version)[:2]) >= self.kvm_since

    @property
    def is_host(self) -> bool:
        return platform.machine().lower() in self.machines

    def size(self, cname: str) -> int:
        return LP64_SIZES[cname]

    def compiler(self) -> str | None:
        """The C compiler that targets this arch, or None if none is installed."""
        candidates = (("gcc", "cc") if self.is_host else ()) + self.cross_compilers
        for cand in candidates:
            if shutil.which(cand):
                return cand
        return None


ARCHES: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("x86_64", "x86_64", "x86_64-linux-gnu", ("x86_64", "amd64"),
             ("x86_64-linux-gnu-gcc",), True, ("x86-linux-any", "x86_64-linux-any"),
             extra_headers=("asm/bootparam.h",)),
        Arch("arm64", "arm64", "aarch64-linux-gnu", ("aarch64", "arm64"),
             ("aarch64-linux-gnu-gcc",), False,
             ("aarch64-linux-any", "arm64-linux-any"), kvm_since=(3, 11)),
        Arch("riscv64", "riscv64", "riscv64-linux-gnu", ("riscv64",),
             ("riscv64-linux-gnu-gcc",), False,
             ("riscv-linux-any", "riscv64-linux-any"), kvm_since=(5, 16)),
    )
}

# The arches whose modules are generated and shipped today.
SHIPPED_ARCHES = ("x86_64", "arm64", "riscv64")


def get_arch(name: str) -> Arch:
    try:
        return ARCHES[name]
    except KeyError:
        raise GeneratorError(f"unknown arch {name!r}; known: {', '.join(ARCHES)}") from None


def host_arch() -> Arch | None:
    for a in ARCHES.values():
        if a.is_host:
            return a
    return None
