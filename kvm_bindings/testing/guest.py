"""Put assembled guest code into a VM and its vCPU into a CPU mode, with the kit's memory layout.

The layout fits the vm fixture's memory (MEMORY_SIZE bytes at MEMORY_ADDR): the GDT
low, the code at CODE_ADDR upward, and for protected and long mode the page tables at
the top with the stack below them. A real-mode guest has its stack at REAL_MODE_STACK
and must fit below it (real mode addresses 64 KiB).
"""

from __future__ import annotations

from ..x86 import X86Vcpu, page_table_size, setup_long_mode, setup_protected_mode, setup_real_mode
from .assembler import Mode, mode_bits

__all__ = ["CODE_ADDR", "GDT_ADDR", "MEMORY_ADDR", "MEMORY_SIZE", "PAGE_TABLES", "REAL_MODE_STACK",
           "STACK", "TSS_ADDR", "load_guest"]

MEMORY_ADDR = 0                 # the vm fixture's guest RAM: 2 MiB at GPA 0
MEMORY_SIZE = 2 << 20
TSS_ADDR = 0xFFFBD000           # KVM_SET_TSS_ADDR: three pages Intel's VMX needs, above RAM
GDT_ADDR = 0x500
CODE_ADDR = 0x1000              # assemble()'s default base
PAGE_TABLES = MEMORY_ADDR + MEMORY_SIZE - page_table_size(1)
STACK = PAGE_TABLES             # grows down from the page tables
REAL_MODE_STACK = 0xF000


def load_guest(vcpu: X86Vcpu, code: bytes, *, mode: Mode | int = "long", base: int = CODE_ADDR) -> None:
    """Write code at base in vcpu's VM and set the vCPU to start it in mode.

    Long mode identity-maps the first GiB (page tables at PAGE_TABLES); protected mode has
    flat segments and no paging; real mode has every segment at 0. The GDT goes at
    GDT_ADDR; the stack is STACK (REAL_MODE_STACK in real mode). GuestMemoryError if
    the VM has no memory where these go (the vm fixture's has).
    """
    bits = mode_bits(mode)
    memory = vcpu.vm.memory
    memory.write(base, code)
    if bits == 64:
        setup_long_mode(vcpu, memory, base, page_tables=PAGE_TABLES, gdt_addr=GDT_ADDR, stack=STACK)
    elif bits == 32:
        setup_protected_mode(vcpu, memory, base, gdt_addr=GDT_ADDR, stack=STACK)
    else:
        setup_real_mode(vcpu, base, stack=REAL_MODE_STACK)
