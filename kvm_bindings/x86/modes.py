"""x86 helpers every VMM otherwise rewrites: CPU modes, a flat GDT, identity paging, CPUID.

The numbers here are the x86 architecture's (control-register bits, descriptor
formats), not KVM's: KVM's own numbers and layouts always come from kvm_bindings.abi.
"""

from __future__ import annotations

import struct

from .._layout import fill
from ..abi import x86_64 as abi
from ..memory import GuestMemory
from .vcpu import X86Vcpu

__all__ = [
    "CR0_CD", "CR0_ET", "CR0_NE", "CR0_NW", "CR0_PE", "CR0_PG", "CR4_PAE", "EFER_LMA",
    "EFER_LME", "GDT_SIZE", "PAGE",
    "PTE_LARGE", "PTE_PRESENT", "PTE_WRITE", "SEL_CODE32", "SEL_CODE64", "SEL_DATA",
    "page_table_size", "set_supported_cpuid", "setup_long_mode", "setup_protected_mode",
    "setup_real_mode", "write_gdt", "write_identity_page_tables",
]

# Architectural bits (Intel SDM vol. 3, 2.5 and 2.2.1).
CR0_PE = 1 << 0      # protected mode
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_NW = 1 << 29     # not write-through  } both set at reset: caches off, until
CR0_CD = 1 << 30     # cache disable      } firmware or a loader clears them
CR0_PG = 1 << 31     # paging
# What firmware or a boot loader leaves in CR0 besides the mode bits: caches on.
_CACHES_OFF = CR0_CD | CR0_NW
CR4_PAE = 1 << 5
EFER_LME = 1 << 8    # long mode enable
EFER_LMA = 1 << 10   # long mode active
PTE_PRESENT, PTE_WRITE, PTE_LARGE = 1 << 0, 1 << 1, 1 << 7

# Flat GDT: null, 64-bit code, 32-bit code, data (base 0, limit 4 GiB).
SEL_CODE64, SEL_CODE32, SEL_DATA = 0x08, 0x10, 0x18
_CODE64, _CODE32, _DATA = 0x00AF9A000000FFFF, 0x00CF9A000000FFFF, 0x00CF92000000FFFF
_GDT = (0, _CODE64, _CODE32, _DATA)
GDT_SIZE = 8 * len(_GDT)
PAGE = 4096


def _segment(seg: abi.kvm_segment, selector: int, *, code: bool, long: bool = False,
             big: bool = True) -> None:
    seg.base, seg.limit, seg.selector = 0, 0xFFFFFFFF, selector
    seg.type = 0xB if code else 0x3     # execute/read or read/write, accessed
    seg.present, seg.dpl, seg.s, seg.g, seg.avl = 1, 0, 1, 1, 0
    seg.l = int(long)
    seg.db = int(big and not long)
    seg.unusable = 0


def setup_real_mode(vcpu: X86Vcpu, entry: int, stack: int = 0) -> None:
    """Real mode with every segment at base 0: the guest runs at physical address `entry` (< 64 KiB)."""
    _check_entry(entry, stack, 0x10000)
    sregs = vcpu.get_sregs()
    # 64 KiB 16-bit segments, and protection, paging and long mode off, whatever mode
    # the vCPU was put in before.
    for i, seg in enumerate((sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss)):
        _segment(seg, 0, code=i == 0, big=False)
        seg.limit, seg.g = 0xFFFF, 0
    sregs.cr0 &= ~(CR0_PE | CR0_PG)
    sregs.cr4 &= ~CR4_PAE
    sregs.efer &= ~(EFER_LME | EFER_LMA)
    vcpu.set_sregs(sregs)
    _start_at(vcpu, entry, stack)


def _check_entry(entry: int, stack: int, limit: int) -> None:
    """Before any state is touched: entry and stack within what the mode addresses."""
    for name, value in (("entry", entry), ("stack", stack)):
        if isinstance(value, int) and not 0 <= value < limit:
            raise ValueError(f"{name}={value:#x} is beyond what this mode addresses ({limit:#x})")


def _start_at(vcpu: X86Vcpu, entry: int, stack: int) -> None:
    """rip = entry, rsp = stack, rflags = its reserved bit, each checked against kvm_regs."""
    regs = vcpu.get_regs()
    fill(regs, {"rip": "entry", "rsp": "stack"}, rip=entry, rsp=stack, rflags=2)
    vcpu.set_regs(regs)


def write_gdt(memory: GuestMemory, gdt_addr: int) -> None:
    """A flat GDT (SEL_CODE64, SEL_CODE32, SEL_DATA) at gdt_addr in guest memory."""
    _write_descriptors(memory, gdt_addr, _GDT)


def _write_descriptors(memory: GuestMemory, addr: int, gdt: tuple[int, ...]) -> None:
    memory.write(addr, struct.pack(f"<{len(gdt)}Q", *gdt))


def setup_protected_mode(vcpu: X86Vcpu, memory: GuestMemory, entry: int, *, gdt_addr: int,
                         stack: int = 0) -> None:
    """32-bit protected mode, flat segments, no paging; the GDT goes at gdt_addr."""
    _enter_protected_mode(vcpu, memory, entry, gdt_addr=gdt_addr, stack=stack,
                          gdt=_GDT, code=SEL_CODE32, data=SEL_DATA)


def _flat_segments(vcpu: X86Vcpu, memory: GuestMemory, gdt: tuple[int, ...], gdt_addr: int,
                   code: int, data: int, *, long: bool) -> abi.kvm_sregs:
    """Write gdt at gdt_addr; return the vCPU's sregs with it loaded, CS = code, the rest data."""
    _write_descriptors(memory, gdt_addr, gdt)
    sregs = vcpu.get_sregs()
    fill(sregs.gdt, {"base": "gdt_addr"}, base=gdt_addr, limit=8 * len(gdt) - 1)
    _segment(sregs.cs, code, code=True, long=long)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(seg, data, code=False)
    return sregs


def _enter_protected_mode(vcpu: X86Vcpu, memory: GuestMemory, entry: int, *, gdt_addr: int,
                          stack: int, gdt: tuple[int, ...], code: int, data: int) -> None:
    _check_entry(entry, stack, 1 << 32)
    sregs = _flat_segments(vcpu, memory, gdt, gdt_addr, code, data, long=False)
    # Paging and long mode off, whatever mode the vCPU was put in before.
    sregs.cr0 = (sregs.cr0 & ~(_CACHES_OFF | CR0_PG)) | CR0_PE | CR0_ET | CR0_NE
    sregs.cr4 &= ~CR4_PAE
    sregs.efer &= ~(EFER_LME | EFER_LMA)
    vcpu.set_sregs(sregs)
    _start_at(vcpu, entry, stack)


def page_table_size(identity_gib: int = 1) -> int:
    """Bytes of page tables setup_long_mode writes to identity-map identity_gib GiB."""
    return PAGE * (2 + identity_gib)


def write_identity_page_tables(memory: GuestMemory, pml4_addr: int, identity_gib: int = 1) -> int:
    """Identity-map the first identity_gib GiB with 2 MiB pages; return CR3.

    PML4 at pml4_addr, one PDPT after it, then one page directory per GiB.
    """
    if pml4_addr % PAGE or not 1 <= identity_gib <= 512:
        raise ValueError("pml4_addr must be page-aligned and identity_gib in 1..512")
    pdpt = pml4_addr + PAGE
    flags = PTE_PRESENT | PTE_WRITE
    memory.write(pml4_addr, struct.pack("<Q", pdpt | flags) + bytes(PAGE - 8))
    pdpt_entries = [pml4_addr + PAGE * (2 + i) | flags for i in range(identity_gib)]
    memory.write(pdpt, struct.pack(f"<{identity_gib}Q", *pdpt_entries) + bytes(PAGE - 8 * identity_gib))
    for gib in range(identity_gib):
        pd = [((gib << 30) + (i << 21)) | flags | PTE_LARGE for i in range(512)]
        memory.write(pml4_addr + PAGE * (2 + gib), struct.pack("<512Q", *pd))
    return pml4_addr


def setup_long_mode(vcpu: X86Vcpu, memory: GuestMemory, entry: int, *, page_tables: int,
                    gdt_addr: int, stack: int = 0, identity_gib: int = 1,
                    set_cpuid: bool = True) -> None:
    """64-bit long mode with the first identity_gib GiB identity-mapped.

    Page tables take page_table_size(identity_gib) bytes at page_tables; the GDT
    GDT_SIZE bytes at gdt_addr. Sets the vCPU's CPUID to what KVM supports first
    (KVM refuses EFER.LME for a guest whose CPUID lacks long mode).
    """
    _check_entry(entry, stack, 1 << 64)
    if set_cpuid:
        set_supported_cpuid(vcpu)
    _enter_long_mode(vcpu, memory, entry, page_tables=page_tables, gdt_addr=gdt_addr,
                     stack=stack, identity_gib=identity_gib, gdt=_GDT, code=SEL_CODE64,
                     data=SEL_DATA)


def _enter_long_mode(vcpu: X86Vcpu, memory: GuestMemory, entry: int, *, page_tables: int,
                     gdt_addr: int, stack: int, identity_gib: int, gdt: tuple[int, ...],
                     code: int, data: int) -> None:
    cr3 = write_identity_page_tables(memory, page_tables, identity_gib)
    sregs = _flat_segments(vcpu, memory, gdt, gdt_addr, code, data, long=True)
    sregs.cr3 = cr3
    sregs.cr4 |= CR4_PAE
    sregs.efer |= EFER_LME | EFER_LMA
    sregs.cr0 = (sregs.cr0 & ~_CACHES_OFF) | CR0_PE | CR0_PG | CR0_ET | CR0_NE
    vcpu.set_sregs(sregs)
    _start_at(vcpu, entry, stack)


def set_supported_cpuid(vcpu: X86Vcpu) -> None:
    """Give the vCPU every CPUID leaf KVM supports on this host (KVM_GET_SUPPORTED_CPUID)."""
    vcpu.set_cpuid2(vcpu.vm.kvm.get_supported_cpuid())
