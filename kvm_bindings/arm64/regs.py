"""arm64 ONE_REG ids: core registers by name, system registers by encoding, SVE registers.

The uapi spells these as macros with arguments (KVM_REG_ARM_CORE_REG(name),
ARM64_SYS_REG(op0, op1, crn, crm, op2), KVM_REG_ARM64_SVE_ZREG(n, i)), which the
generator cannot turn into constants; they are computed here from the generated
layout of struct kvm_regs and the generated masks and shifts, and tests/test_arm64.py
checks every one against the C compiler. Each id carries its size (KVM_REG_SIZE_*), so
get_one_reg() of a V register returns a 128-bit int.
"""

from __future__ import annotations

import ctypes
import re

from .._layout import offset_of, type_of
from ..abi import arm64 as abi
from ..vcpu import reg_size, size_code

__all__ = [
    "CORE_REGS", "CORE_REG_PATHS", "core_reg", "irq_line", "reg_size", "size_code", "sve_ffr",
    "sve_preg", "sve_zreg", "sys_reg"
]

_U32 = ctypes.sizeof(ctypes.c_uint32)     # KVM_REG_ARM_CORE_REG counts in __u32 words


def _core_paths() -> dict[str, str]:
    """{short name: struct kvm_regs member} for every core register KVM accepts (the
    kernel's core_reg_size_from_offset): x0-x30, sp, pc, pstate, sp_el1, elr_el1, the
    SPSRs, v0-v31, fpsr, fpcr."""
    paths = {f"x{i}": f"regs.regs[{i}]" for i in range(type_of(abi.kvm_regs, "regs.regs")._length_)}
    paths |= {"sp": "regs.sp", "pc": "regs.pc", "pstate": "regs.pstate",
              "sp_el1": "sp_el1", "elr_el1": "elr_el1"}
    for mode in ("EL1", "ABT", "UND", "IRQ", "FIQ"):
        paths[f"spsr_{mode.lower()}"] = f"spsr[{getattr(abi, f'KVM_SPSR_{mode}')}]"
    nv = type_of(abi.kvm_regs, "fp_regs.vregs")._length_
    paths |= {f"v{i}": f"fp_regs.vregs[{i}]" for i in range(nv)}
    paths |= {"fpsr": "fp_regs.fpsr", "fpcr": "fp_regs.fpcr"}
    return paths


_INDEXED = re.compile(r"^(.*)\[(\d+)\]$")


def _core_id(path: str) -> int:
    """KVM_REG_ARM64 | KVM_REG_ARM_CORE | size | KVM_REG_ARM_CORE_REG(path), path a
    struct kvm_regs member ending in at most one [index]."""
    m = _INDEXED.match(path)
    if m:
        array = type_of(abi.kvm_regs, m.group(1))
        element = array._type_
        offset = offset_of(abi.kvm_regs, m.group(1)) + int(m.group(2)) * ctypes.sizeof(element)
        size = ctypes.sizeof(element)
    else:
        offset, size = offset_of(abi.kvm_regs, path), ctypes.sizeof(type_of(abi.kvm_regs, path))
    return abi.KVM_REG_ARM64 | abi.KVM_REG_ARM_CORE | size_code(size) | offset // _U32


#: Short name -> struct kvm_regs member (the argument KVM_REG_ARM_CORE_REG takes).
CORE_REG_PATHS: dict[str, str] = _core_paths()
#: Short name -> ONE_REG id, for every core register.
CORE_REGS: dict[str, int] = {name: _core_id(path) for name, path in CORE_REG_PATHS.items()}
_BY_PATH = {path: CORE_REGS[name] for name, path in CORE_REG_PATHS.items()}


def core_reg(name: str) -> int:
    """The ONE_REG id of a core register: a short name ("x0", "pc", "v31", "fpsr",
    "spsr_el1") or the struct kvm_regs member the C macro takes ("regs.regs[0]",
    "fp_regs.vregs[31]"). The size in the id is the member's: 64 bits, 128 for V
    registers, 32 for fpsr and fpcr."""
    if not isinstance(name, str):
        raise TypeError(f"a core register name is a str, not {type(name).__name__}")
    reg = CORE_REGS.get(name, _BY_PATH.get(name))
    if reg is None:
        raise ValueError(f"{name!r} is not an arm64 core register: use x0..x30, sp, pc, pstate, "
                         f"sp_el1, elr_el1, spsr_el1/abt/und/irq/fiq, v0..v31, fpsr, fpcr, or a "
                         f"struct kvm_regs member such as 'regs.regs[0]'")
    return reg


def _field(value: int, what: str, mask: int, shift: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an integer, not {type(value).__name__}")
    limit = mask >> shift
    if not 0 <= value <= limit:
        raise ValueError(f"{what}={value} is out of range: the id has room for 0..{limit}")
    return value << shift


def sys_reg(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """The ONE_REG id of an AArch64 system register by its encoding (ARM64_SYS_REG: 64 bits).

    Unlike the C macro, which masks each field, a field out of range is a ValueError.
    """
    return (abi.KVM_REG_ARM64 | abi.KVM_REG_SIZE_U64 | abi.KVM_REG_ARM64_SYSREG
            | _field(op0, "op0", abi.KVM_REG_ARM64_SYSREG_OP0_MASK, abi.KVM_REG_ARM64_SYSREG_OP0_SHIFT)
            | _field(op1, "op1", abi.KVM_REG_ARM64_SYSREG_OP1_MASK, abi.KVM_REG_ARM64_SYSREG_OP1_SHIFT)
            | _field(crn, "crn", abi.KVM_REG_ARM64_SYSREG_CRN_MASK, abi.KVM_REG_ARM64_SYSREG_CRN_SHIFT)
            | _field(crm, "crm", abi.KVM_REG_ARM64_SYSREG_CRM_MASK, abi.KVM_REG_ARM64_SYSREG_CRM_SHIFT)
            | _field(op2, "op2", abi.KVM_REG_ARM64_SYSREG_OP2_MASK, abi.KVM_REG_ARM64_SYSREG_OP2_SHIFT))


_SVE = abi.KVM_REG_ARM64 | abi.KVM_REG_ARM64_SVE
_SVE_INDEX_SHIFT = (abi.KVM_ARM64_SVE_MAX_SLICES - 1).bit_length()   # the `<< 5` in the macros


def _slice(i: int) -> int:
    return _field(i, "slice", abi.KVM_ARM64_SVE_MAX_SLICES - 1, 0)


def sve_zreg(n: int, slice: int = 0) -> int:
    """KVM_REG_ARM64_SVE_ZREG(n, slice): a 2048-bit slice of SVE register Zn (after
    vcpu.finalize(KVM_ARM_VCPU_SVE))."""
    return (_SVE | abi.KVM_REG_ARM64_SVE_ZREG_BASE | abi.KVM_REG_SIZE_U2048
            | _field(n, "n", abi.KVM_ARM64_SVE_NUM_ZREGS - 1, 0) << _SVE_INDEX_SHIFT | _slice(slice))


def sve_preg(n: int, slice: int = 0) -> int:
    """KVM_REG_ARM64_SVE_PREG(n, slice): a 256-bit slice of SVE predicate register Pn."""
    return (_SVE | abi.KVM_REG_ARM64_SVE_PREG_BASE | abi.KVM_REG_SIZE_U256
            | _field(n, "n", abi.KVM_ARM64_SVE_NUM_PREGS - 1, 0) << _SVE_INDEX_SHIFT | _slice(slice))


def sve_ffr(slice: int = 0) -> int:
    """KVM_REG_ARM64_SVE_FFR(slice): a 256-bit slice of the SVE first-fault register."""
    return _SVE | abi.KVM_REG_ARM64_SVE_FFR_BASE | abi.KVM_REG_SIZE_U256 | _slice(slice)


def irq_line(irq_type: int, number: int, vcpu: int = 0) -> int:
    """The `irq` of KVM_IRQ_LINE on arm64 (vm.set_irq_line): irq_type is
    KVM_ARM_IRQ_TYPE_CPU (number: KVM_ARM_IRQ_CPU_IRQ/FIQ of vCPU `vcpu`), _SPI (number is
    the INTID, vcpu 0) or _PPI (number is the INTID on vCPU `vcpu`). vCPU indices past the
    first field's range go in the VCPU2 field (KVM_CAP_ARM_IRQ_LINE_LAYOUT_2)."""
    vcpu_width = abi.KVM_ARM_IRQ_VCPU_MASK.bit_length()
    vcpu = _field(vcpu, "vcpu", abi.KVM_ARM_IRQ_VCPU2_MASK << vcpu_width | abi.KVM_ARM_IRQ_VCPU_MASK, 0)
    return (_field(irq_type, "irq_type", abi.KVM_ARM_IRQ_TYPE_MASK, 0) << abi.KVM_ARM_IRQ_TYPE_SHIFT
            | (vcpu & abi.KVM_ARM_IRQ_VCPU_MASK) << abi.KVM_ARM_IRQ_VCPU_SHIFT
            | (vcpu >> vcpu_width) << abi.KVM_ARM_IRQ_VCPU2_SHIFT
            | _field(number, "number", abi.KVM_ARM_IRQ_NUM_MASK, 0) << abi.KVM_ARM_IRQ_NUM_SHIFT)
