"""kvm_bindings.x86 puts a vCPU in real, protected or long mode, and real guests run there."""

from __future__ import annotations

import pytest

from kvm_bindings import HltExit, IoExit, x86
from kvm_bindings.testing import assemble as kit_assemble
from kvm_bindings.testing import load_guest, run_guest

from .conftest import GDT_ADDR, LOAD_ADDR

# Guests written with the test kit (kvm_bindings.testing): each reports through GUEST_SYNC.
READS_CR0 = """
    mov     %cr0, %eax
    GUEST_SYNC(%eax)
    movl    $0x32323232, 0x100000   // above 1 MiB, which real mode cannot reach
    GUEST_DONE
"""
READS_EFER = """
    movabs  $0x1122334455667788, %rax
    mov     %rax, 0x6000
    mov     $0xc0000080, %ecx       // IA32_EFER
    rdmsr
    GUEST_SYNC(%rax)
    GUEST_DONE
"""


def test_real_mode_runs_code_at_the_entry_point(real_mode):
    vcpu = real_mode("hlt")
    assert isinstance(vcpu.run(), HltExit)
    assert vcpu.get_regs().rip == LOAD_ADDR + 1          # just past the hlt


def test_protected_mode_has_pe_set_and_reaches_past_1mib(kit_vm):
    vm = kit_vm
    vcpu = vm.create_vcpu(0)
    load_guest(vcpu, kit_assemble(READS_CR0, mode="protected"), mode="protected")
    [cr0] = (event.value for event in run_guest(vcpu))      # as the guest reads it
    assert cr0 & x86.CR0_PE and not cr0 & x86.CR0_PG
    assert not cr0 & (x86.CR0_CD | x86.CR0_NW)         # caches on, as a loader leaves them
    assert vm.memory.read(0x100000, 4) == b"2222"


def test_long_mode_guest_writes_a_64_bit_value(kit_vm):
    vm = kit_vm
    vcpu = vm.create_vcpu(0)
    load_guest(vcpu, kit_assemble(READS_EFER))
    sregs = vcpu.get_sregs()
    assert sregs.efer & x86.EFER_LMA and sregs.cs.l == 1
    [efer] = (event.value for event in run_guest(vcpu))
    assert efer & x86.EFER_LMA
    assert vm.memory.read_int(0x6000, 8) == 0x1122334455667788


def test_identity_page_tables_map_each_2mib_page_to_itself(vm):
    vm.add_memory(0x100000, x86.page_table_size(2))
    cr3 = x86.write_identity_page_tables(vm.memory, 0x100000, identity_gib=2)
    pml4 = vm.memory.read_int(cr3, 8)
    pdpt = pml4 & ~0xFFF
    pd1 = vm.memory.read_int(pdpt + 8, 8) & ~0xFFF          # second GiB
    entry = vm.memory.read_int(pd1 + 3 * 8, 8)
    assert entry & ~0xFFF == (1 << 30) + 3 * (2 << 20)
    assert entry & (x86.PTE_PRESENT | x86.PTE_WRITE | x86.PTE_LARGE) == \
        x86.PTE_PRESENT | x86.PTE_WRITE | x86.PTE_LARGE


def test_translate_walks_the_guests_page_tables(vm):
    vcpu = vm.create_vcpu(0)
    x86.setup_long_mode(vcpu, vm.memory, LOAD_ADDR, page_tables=0x8000, gdt_addr=GDT_ADDR)
    tr = vcpu.translate(0x6123)
    assert tr.valid and tr.physical_address == 0x6123


@pytest.mark.parametrize("setup", ["real", "protected"])
def test_an_entry_beyond_the_mode_is_refused_before_any_state_changes(vm, setup):
    from kvm_bindings import x86
    vcpu = vm.create_vcpu(0)
    before = bytes(vcpu.get_sregs()), bytes(vcpu.get_regs())
    with pytest.raises(ValueError, match="entry=0x"):
        if setup == "real":
            x86.setup_real_mode(vcpu, entry=0x10000)
        else:
            x86.setup_protected_mode(vcpu, vm.memory, 1 << 32, gdt_addr=0x500)
    with pytest.raises(ValueError, match="entry=0x"):
        x86.setup_long_mode(vcpu, vm.memory, 2**64, page_tables=0x8000, gdt_addr=0x500)
    assert (bytes(vcpu.get_sregs()), bytes(vcpu.get_regs())) == before


def _in_long_mode(vm, vcpu) -> None:
    x86.setup_long_mode(vcpu, vm.memory, LOAD_ADDR, page_tables=0x8000, gdt_addr=GDT_ADDR)
    assert vcpu.get_sregs().efer & x86.EFER_LMA


def test_protected_mode_after_long_mode_turns_paging_and_long_mode_off(kit_vm):
    vm = kit_vm
    vcpu = vm.create_vcpu(0)
    _in_long_mode(vm, vcpu)
    load_guest(vcpu, kit_assemble(READS_CR0, mode="protected"), mode="protected")
    sregs = vcpu.get_sregs()
    assert not sregs.efer & (x86.EFER_LME | x86.EFER_LMA) and not sregs.cr4 & x86.CR4_PAE
    [cr0] = (event.value for event in run_guest(vcpu))      # the guest reads CR0 itself
    assert cr0 & x86.CR0_PE and not cr0 & x86.CR0_PG
    assert vm.memory.read(0x100000, 4) == b"2222"


@pytest.mark.parametrize("before", ["long", "protected"])
def test_real_mode_after_another_mode_runs_16_bit_code(vm, assemble, before):
    vcpu = vm.create_vcpu(0)
    if before == "long":
        _in_long_mode(vm, vcpu)
    else:
        x86.setup_protected_mode(vcpu, vm.memory, LOAD_ADDR, gdt_addr=GDT_ADDR)
    vm.memory.write(LOAD_ADDR, assemble("port_io"))
    x86.setup_real_mode(vcpu, LOAD_ADDR)
    sregs = vcpu.get_sregs()
    assert not sregs.cr0 & (x86.CR0_PE | x86.CR0_PG) and not sregs.efer & x86.EFER_LMA
    # 16-bit code decodes differently as 32-bit code: "mov $0x3f8, %dx" would swallow the
    # next instruction's bytes as the rest of an imm32, and the first OUT would not be 'H'.
    first = vcpu.run()
    assert isinstance(first, IoExit) and (first.port, bytes(first.data)) == (0x3F8, b"H")
