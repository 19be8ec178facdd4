"""riscv64 ONE_REG ids: core registers, CSRs, config, timer, and ISA and SBI extensions.

The uapi spells these as macros with arguments (KVM_REG_RISCV_CORE_REG(name),
KVM_REG_RISCV_CSR_REG(name), ...), which the generator cannot turn into constants; they
are computed here from the generated struct layouts, types and shifts, and
tests/test_riscv64.py checks every one against the C compiler. The size in each id is
the member's: unsigned long (64 bits on rv64), or __u64 for the timer.
"""

from __future__ import annotations

import ctypes
from typing import Any

from .._layout import offset_of, type_of
from ..abi import riscv64 as abi
from ..vcpu import reg_size, size_code

__all__ = [
    "CONFIG_REGS", "CORE_REGS", "CSRS", "TIMER_REGS", "ULONG", "config_reg", "core_reg", "csr_reg",
    "isa_ext_reg", "reg_size", "sbi_ext_reg", "size_code", "timer_reg"
]

# The macros count in units of unsigned long, the arch's register width.
ULONG = getattr(abi, "__BITS_PER_LONG") // 8


def _scalars(cls: Any, prefix: str = "") -> list[str]:
    """Every scalar member of cls as a dotted path, in order."""
    out = []
    for entry in cls._fields_:
        name, ctype = entry[0], entry[1]
        if name.startswith("_"):
            continue
        if isinstance(ctype, type) and issubclass(ctype, ctypes.Structure):
            out += _scalars(ctype, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def _member_id(kind: int, cls: Any, path: str, unit: int) -> int:
    """KVM_REG_RISCV | kind | size | offsetof(cls, path) / unit: the shape of every
    KVM_REG_RISCV_*_REG(name) macro."""
    size = ctypes.sizeof(type_of(cls, path))
    return abi.KVM_REG_RISCV | kind | size_code(size) | offset_of(cls, path) // unit


def _table(kind: int, cls: Any, unit: int, short: bool) -> dict[str, int]:
    ids = {}
    for path in _scalars(cls):
        reg = _member_id(kind, cls, path, unit)
        ids[path] = reg
        if short:
            ids[path.rsplit(".", 1)[-1]] = reg
    return ids


#: Name -> id. Core registers by their struct user_regs_struct names ("pc", "ra", "a0")
#: or kvm_riscv_core member ("regs.pc"), and "mode".
CORE_REGS: dict[str, int] = _table(abi.KVM_REG_RISCV_CORE, abi.kvm_riscv_core, ULONG, True)
#: CSR name -> id: the general CSRs, the AIA CSRs and the Smstateen CSRs, each in its subtype.
CSRS: dict[str, int] = (
    _table(abi.KVM_REG_RISCV_CSR | abi.KVM_REG_RISCV_CSR_GENERAL, abi.kvm_riscv_csr, ULONG, False)
    | _table(abi.KVM_REG_RISCV_CSR | abi.KVM_REG_RISCV_CSR_AIA, abi.kvm_riscv_aia_csr, ULONG, False)
    | _table(abi.KVM_REG_RISCV_CSR | abi.KVM_REG_RISCV_CSR_SMSTATEEN, abi.kvm_riscv_smstateen_csr,
             ULONG, False))
#: Config register name -> id (struct kvm_riscv_config: "isa", "mvendorid", ...).
CONFIG_REGS: dict[str, int] = _table(abi.KVM_REG_RISCV_CONFIG, abi.kvm_riscv_config, ULONG, False)
#: Timer register name -> id (struct kvm_riscv_timer: "frequency", "time", "compare", "state").
TIMER_REGS: dict[str, int] = _table(abi.KVM_REG_RISCV_TIMER, abi.kvm_riscv_timer,
                                    ctypes.sizeof(ctypes.c_uint64), False)


def _lookup(table: dict[str, int], name: str, what: str) -> int:
    if not isinstance(name, str):
        raise TypeError(f"a {what} name is a str, not {type(name).__name__}")
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"{name!r} is not a riscv64 {what}: known are "
                         f"{', '.join(table)}") from None


def core_reg(name: str) -> int:
    """KVM_REG_RISCV_CORE_REG: "pc", "ra", "sp", ..., "t6" (or "regs.pc"), and "mode"."""
    return _lookup(CORE_REGS, name, "core register")


def csr_reg(name: str) -> int:
    """KVM_REG_RISCV_CSR_REG / _AIA_REG / _SMSTATEEN_REG, by CSR name ("sstatus", "satp",
    "siselect", "sstateen0", ...)."""
    return _lookup(CSRS, name, "CSR")


def config_reg(name: str) -> int:
    """KVM_REG_RISCV_CONFIG_REG: "isa", "zicbom_block_size", "mvendorid", "satp_mode", ..."""
    return _lookup(CONFIG_REGS, name, "config register")


def timer_reg(name: str) -> int:
    """KVM_REG_RISCV_TIMER_REG: "frequency", "time", "compare", "state" (__u64 each)."""
    return _lookup(TIMER_REGS, name, "timer register")


def _extension(ext: int | str, enum: Any, limit: int, what: str) -> int:
    if isinstance(ext, str):
        try:
            return int(enum[ext.upper()])
        except KeyError:
            raise ValueError(f"{ext!r} is not a {what} KVM knows: known are "
                             f"{', '.join(m.name.lower() for m in enum if m < limit)}") from None
    if isinstance(ext, bool) or not isinstance(ext, int):
        raise TypeError(f"a {what} is an int or a name, not {type(ext).__name__}")
    if not 0 <= ext < limit:
        raise ValueError(f"{what} {ext} is out of range: KVM knows 0..{limit - 1}")
    return int(ext)


def isa_ext_reg(ext: int | str) -> int:
    """The ONE_REG id that enables (1) or disables (0) one ISA extension: KVM_REG_RISCV_ISA_EXT
    | KVM_REG_RISCV_ISA_SINGLE | ext, ext an abi.riscv64.RiscvIsaExtId or its name ("zba")."""
    ext = _extension(ext, abi.RiscvIsaExtId, abi.KVM_RISCV_ISA_EXT_MAX, "ISA extension")
    return (abi.KVM_REG_RISCV | abi.KVM_REG_RISCV_ISA_EXT | abi.KVM_REG_RISCV_ISA_SINGLE
            | size_code(ULONG) | ext)


def sbi_ext_reg(ext: int | str) -> int:
    """The ONE_REG id that enables (1) or disables (0) one SBI extension: KVM_REG_RISCV_SBI_EXT
    | KVM_REG_RISCV_SBI_SINGLE | ext, ext an abi.riscv64.RiscvSbiExtId or its name ("hsm")."""
    ext = _extension(ext, abi.RiscvSbiExtId, abi.KVM_RISCV_SBI_EXT_MAX, "SBI extension")
    return (abi.KVM_REG_RISCV | abi.KVM_REG_RISCV_SBI_EXT | abi.KVM_REG_RISCV_SBI_SINGLE
            | size_code(ULONG) | ext)
