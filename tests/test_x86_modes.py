"""kvm_bindings.x86 puts a vCPU in real, protected or long mode, and real guests run there."""

from __future__ import annotations

import pytest

from kvm_bindings import HltExit, IoExit, x86

from .conftest import GDT_ADDR, LOAD_ADDR


def test_real_mode_runs_code_at_the_entry_point(real_mode):
    vcpu = real_mode("hlt")
    assert isinstance(vcpu.run(), HltExit)
    assert vcpu.get_regs().rip == LOAD_ADDR + 1          # just past the hlt


def test_protected_mode_has_pe_set_and_reaches_past_1mib(vm, protected_mode):
    vm.add_memory(0x100000, 0x1000)
    vcpu = protected_mode("protected")
    report = vcpu.run()
    assert isinstance(report, IoExit)
    cr0 = int.from_bytes(report.data, "little")      # as the guest reads it
    assert cr0 & x86.CR0_PE and not cr0 & x86.CR0_PG
    assert not cr0 & (x86.CR0_CD | x86.CR0_NW)         # caches on, as a loader leaves them
    assert isinstance(vcpu.run(), HltExit)
    assert vm.memory.read(0x100000, 4) == b"2222"


def test_long_mode_guest_writes_a_64_bit_value(vm, assemble):
    vm.memory.write(LOAD_ADDR, assemble("long_mode"))
    vcpu = vm.create_vcpu(0)
    x86.setup_long_mode(vcpu, vm.memory, LOAD_ADDR, page_tables=0x8000, gdt_addr=GDT_ADDR,
                        stack=0x7000)
    sregs = vcpu.get_sregs()
    assert sregs.efer & x86.EFER_LMA and sregs.cs.l == 1
    efer = vcpu.run()
    assert isinstance(efer, IoExit) and int.from_bytes(efer.data, "little") & x86.EFER_LMA
    assert isinstance(vcpu.run(), HltExit)
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


def test_translate_walks_the_guests_page_tables(vm, assemble):
    vm.memory.write(LOAD_ADDR, assemble("long_mode"))
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


def test_protected_mode_after_long_mode_turns_paging_and_long_mode_off(vm, assemble):
    vm.add_memory(0x100000, 0x1000)
    vcpu = vm.create_vcpu(0)
    _in_long_mode(vm, vcpu)
    vm.memory.write(LOAD_ADDR, assemble("protected"))
    x86.setup_protected_mode(vcpu, vm.memory, LOAD_ADDR, gdt_addr=GDT_ADDR, stack=0x8000)
    sregs = vcpu.get_sregs()
    assert not sregs.efer & (x86.EFER_LME | x86.EFER_LMA) and not sregs.cr4 & x86.CR4_PAE
    report = vcpu.run()                                 # the guest reads CR0 itself
    assert isinstance(report, IoExit)
    cr0 = int.from_bytes(report.data, "little")
    assert cr0 & x86.CR0_PE and not cr0 & x86.CR0_PG
    assert isinstance(vcpu.run(), HltExit) and vm.memory.read(0x100000, 4) == b"2222"


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
