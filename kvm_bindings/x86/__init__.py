"""x86: the x86 classes (X86Kvm -> X86Vm -> X86Vcpu) and the helpers every x86 VMM
otherwise rewrites (CPU modes, a flat GDT, identity paging, CPUID, and load_linux(): the
Linux boot protocol for bzImage and ELF vmlinux kernels).

On an x86_64 host kvm_bindings.Kvm is X86Kvm, so kvm_bindings.Kvm().create_vm()
is already an X86Vm; import the classes from here to name them in type annotations.
"""

from __future__ import annotations

from .boot import LEGACY_HOLE, E820Entry, E820Type, LinuxBoot, Placed, load_linux
from .modes import (
    CR0_CD,
    CR0_ET,
    CR0_NE,
    CR0_NW,
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    GDT_SIZE,
    PAGE,
    PTE_LARGE,
    PTE_PRESENT,
    PTE_WRITE,
    SEL_CODE32,
    SEL_CODE64,
    SEL_DATA,
    page_table_size,
    set_supported_cpuid,
    setup_long_mode,
    setup_protected_mode,
    setup_real_mode,
    write_gdt,
    write_identity_page_tables,
)
from .system import X86Kvm
from .vcpu import X86Vcpu
from .vm import X86Vm

__all__ = [
    "LEGACY_HOLE", "E820Entry", "E820Type", "LinuxBoot", "Placed", "load_linux",
    "CR0_CD", "CR0_ET", "CR0_NE", "CR0_NW", "CR0_PE", "CR0_PG", "CR4_PAE", "EFER_LMA",
    "EFER_LME", "GDT_SIZE", "PAGE", "PTE_LARGE", "PTE_PRESENT", "PTE_WRITE",
    "SEL_CODE32", "SEL_CODE64", "SEL_DATA", "X86Kvm", "X86Vcpu", "X86Vm", "page_table_size",
    "set_supported_cpuid", "setup_long_mode", "setup_protected_mode", "setup_real_mode",
    "write_gdt", "write_identity_page_tables",
]
