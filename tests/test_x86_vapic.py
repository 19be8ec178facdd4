"""The paravirtual TPR (KVM_SET_VAPIC_ADDR) and TPR access reporting (KVM_TPR_ACCESS_REPORTING),
seen by a protected-mode guest that touches its local APIC (0xfee00000, unpaged) and the
word the kernel keeps in guest memory. The oracles are the kernel's: the guest's own reads
and the LAPIC state KVM_GET_LAPIC returns."""

from __future__ import annotations

import ctypes

import pytest

from kvm_bindings import GuestMemoryError, KvmError, KvmUnsupported, TprAccessExit, abi
from kvm_bindings.testing import MEMORY_SIZE, Sync, load_guest, ucalls
from kvm_bindings.testing import assemble as kit_assemble

from .conftest import no_ioctls

VAPIC = 0x80000                         # the guest's TPR word, in the kit's RAM
TPR = 0x80                              # APIC_TASKPRI: offset in the APIC page and in kvm_lapic_state


def _guest(vm, source: str, irqchip: bool = True):
    if irqchip:
        vm.create_irqchip()
    vm.add_memory(0x10000, MEMORY_SIZE - 0x10000)
    vcpu = vm.create_vcpu(0)
    load_guest(vcpu, kit_assemble(source, mode="protected"), mode="protected")
    return vcpu


def _lapic_tpr(vcpu) -> int:
    at = abi.kvm_lapic_state.regs.offset + TPR       # (regs is a char array: read it raw)
    return int.from_bytes(bytes(vcpu.get_lapic())[at:at + 4], "little")


def _set_lapic_tpr(vcpu, value: int) -> None:
    lapic = vcpu.get_lapic()
    ctypes.memmove(ctypes.addressof(lapic) + abi.kvm_lapic_state.regs.offset + TPR,
                   value.to_bytes(4, "little"), 4)
    vcpu.set_lapic(lapic)




def test_the_vapic_word_carries_the_tpr_both_ways_until_turned_off(vm):
    vcpu = _guest(vm, r"""
        mov     $0xfee00000, %esi
        movl    $0x1ff, 0xf0(%esi)          /* the APIC on (spurious vector register) */
        GUEST_SYNC($0x1111)                 /* the host sets the TPR */
        mov     0x80000, %eax
        GUEST_SYNC(%eax)
        movl    $0x70, 0x80000              /* a plain store raises the TPR */
        GUEST_SYNC($0)                      /* at an exit KVM takes it (here: by the next) */
        mov     0x80(%esi), %eax
        GUEST_SYNC(%eax)
        GUEST_SYNC($0x2222)                 /* the host reads the TPR, turns the word off */
        movl    $0x20, 0x80000
        GUEST_SYNC($0x3333)                 /* the host reads the TPR, sets it */
        mov     0x80000, %eax
        GUEST_SYNC(%eax)
        GUEST_DONE
    """)
    vcpu.set_vapic_addr(VAPIC)
    seen_by_host = []

    def at(value):
        if value == 0x1111:
            _set_lapic_tpr(vcpu, 0x40)
        if value in (0x2222, 0x3333):
            seen_by_host.append(_lapic_tpr(vcpu))
        if value == 0x2222:
            vcpu.set_vapic_addr(0)
        if value == 0x3333:
            _set_lapic_tpr(vcpu, 0x10)
    syncs = [e.value for e in ucalls(vcpu, timeout=10) if isinstance(e, Sync) and not at(e.value)]
    _, word, _, tpr_via_apic, _, _, word_after_off = syncs
    # KVM writes the word when it next looks at interrupts (set_lapic() makes it look).
    assert word & 0xFF == 0x40
    assert seen_by_host == [0x70, 0x70]     # the guest's store reached the APIC; once off, not
    assert tpr_via_apic == 0x70
    assert word_after_off == 0x20           # and once off, KVM writes the word no more


def test_tpr_accesses_are_reported_until_turned_off(vm):
    vcpu = _guest(vm, r"""
        mov     $0xfee00000, %esi
        movl    $0x1ff, 0xf0(%esi)
        GUEST_SYNC($read_tpr)
        GUEST_SYNC($write_tpr)
    read_tpr:
        mov     0x80(%esi), %eax
        GUEST_SYNC($0xaaaa)
    write_tpr:
        movl    $0x30, 0x80(%esi)
        GUEST_SYNC($0xbbbb)                 /* the host turns reporting off */
        mov     0x80(%esi), %eax
        movl    $0x50, 0x80(%esi)
        GUEST_SYNC($0xcccc)
        GUEST_DONE
    """)
    vcpu.set_tpr_access_reporting(True)
    order: list = []

    def handler(exit):
        if isinstance(exit, TprAccessExit):
            order.append(("tpr", exit.rip, exit.is_write))
            return True
        return False
    for event in ucalls(vcpu, handler=handler, timeout=10):
        if isinstance(event, Sync):
            order.append(event.value)
            if event.value == 0xBBBB:
                vcpu.set_tpr_access_reporting(False)
    read_at, write_at, *order = order
    if order[0] != 0xAAAA:
        # The kernel reports at the next entry after the access, before the guest goes on.
        assert order == [("tpr", read_at, 0), 0xAAAA, ("tpr", write_at, 1), 0xBBBB, 0xCCCC]
    else:
        # A host that emulates on past the access (software-assisted KVM, as here) reports it
        # only after its next exit, whose data then fill kvm_run.tpr_access: kind only.
        kinds = [x if isinstance(x, int) else x[0] for x in order]
        assert kinds == [0xAAAA, "tpr", 0xBBBB, "tpr", 0xCCCC]
    assert _lapic_tpr(vcpu) == 0x50         # the unreported accesses happened all the same


def test_both_need_the_in_kernel_local_apic(vm):
    vm.add_memory(0x10000, 0x10000)
    vcpu = vm.create_vcpu(0)
    for call in (lambda: vcpu.set_vapic_addr(VAPIC & 0xFFFF | 0x10000),
                 lambda: vcpu.set_tpr_access_reporting(True)):
        with pytest.raises(KvmError, match="no in-kernel local APIC: vm.create_irqchip"):
            call()


def test_set_vapic_addr_wants_the_word_in_guest_memory(vm, monkeypatch):
    vm.create_irqchip()
    vcpu = vm.create_vcpu(0)                    # the fixture's 64 KiB at 0
    issued = no_ioctls(monkeypatch, vcpu)
    for gpa in (0x10000, 0xFFFE, 0xFEE00080):
        with pytest.raises(GuestMemoryError):
            vcpu.set_vapic_addr(gpa)
    for bad, kind in (("0x1000", TypeError), (-1, OverflowError), (2**64, OverflowError)):
        with pytest.raises(kind):
            vcpu.set_vapic_addr(bad)
    with pytest.raises(TypeError, match="bool"):
        vcpu.set_tpr_access_reporting(1)
    assert issued == []


def test_the_requests_are_the_generated_structs_with_the_values_given(vm, monkeypatch):
    vm.create_irqchip()
    vcpu = vm.create_vcpu(0)
    issued = no_ioctls(monkeypatch, vcpu)     # get_lapic is an ioctl too: recorded, harmless
    vcpu.set_vapic_addr(0xFFFC)
    vcpu.set_tpr_access_reporting(True)
    sent = [(n, bytes(ctypes.string_at(ctypes.addressof(a), ctypes.sizeof(a))))
            for n, a in issued if n in (abi.KVM_SET_VAPIC_ADDR, abi.KVM_TPR_ACCESS_REPORTING)]
    assert [n for n, _ in sent] == [abi.KVM_SET_VAPIC_ADDR, abi.KVM_TPR_ACCESS_REPORTING]
    assert len(sent[0][1]) == abi.IOCTLS["KVM_SET_VAPIC_ADDR"].size
    assert sent[0][1] == (0xFFFC).to_bytes(8, "little")
    assert len(sent[1][1]) == abi.IOCTLS["KVM_TPR_ACCESS_REPORTING"].size
    off = abi.kvm_tpr_access_ctl.enabled.offset
    assert sent[1][1][off:off + 4] == (1).to_bytes(4, "little")
    assert not any(sent[1][1][:off] + sent[1][1][off + 4:])    # flags and reserved zero


def test_both_name_kvm_cap_vapic_where_it_is_missing(vm, monkeypatch):
    vm.create_irqchip()
    vcpu = vm.create_vcpu(0)
    answers = {c: vm.check_extension(c) for c in abi.Capability}   # before ioctls are replaced
    monkeypatch.setattr(vm, "check_extension",
                        lambda c: 0 if c == abi.Capability.VAPIC else answers[c])
    issued = no_ioctls(monkeypatch, vcpu)
    for call in (lambda: vcpu.set_vapic_addr(0x1000), lambda: vcpu.set_tpr_access_reporting(True)):
        with pytest.raises(KvmUnsupported, match="KVM_CAP_VAPIC"):
            call()
    assert issued == []


def test_a_restored_vcpu_keeps_its_vapic_word_and_tpr_reporting(kvm, vm):
    vcpu = _guest(vm, r"""
        mov     $0xfee00000, %esi
        movl    $0x1ff, 0xf0(%esi)
        GUEST_SYNC($0x1111)                 /* saved here; the copy's TPR is set here */
        mov     0x80000, %eax
        GUEST_SYNC(%eax)
        mov     0x80(%esi), %eax            /* reported, if reporting came back on */
        GUEST_SYNC($0x2222)
        GUEST_DONE
    """)
    vcpu.set_vapic_addr(VAPIC)
    vcpu.set_tpr_access_reporting(True)
    events = ucalls(vcpu, timeout=10)
    assert next(events).value == 0x1111
    state = vm.save_state()
    vcpu.set_vapic_addr(0)                  # changed after the save: load_state puts it back
    vcpu.set_tpr_access_reporting(False)
    vm.load_state(state)
    with kvm.restore_vm(state) as copy:
        for target in (copy.vcpus[0], vcpu):
            _set_lapic_tpr(target, 0x40)
            reports: list = []

            def handler(exit, reports=reports):
                reports.append(exit)
                return isinstance(exit, TprAccessExit)
            syncs = [e.value for e in ucalls(target, handler=handler, timeout=10)
                     if isinstance(e, Sync)]
            assert syncs[0] & 0xFF == 0x40  # KVM wrote the word: the address came back
            assert len(reports) == 1        # and reporting is on again
