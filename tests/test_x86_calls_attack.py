"""An adversary's review of the issue-14 x86 calls (setup_mce, inject_mce, get_mce_cap_supported,
set_vapic_addr, set_tpr_access_reporting, set_cpuid, set_pmu_event_filter).

Each test named a defect found then (since fixed) or pins behaviour that was unchecked.
The defects: the machine-check unit and the vapic/TPR-reporting setup were not carried by a
snapshot, inject_mce misreported an error the kernel dropped, and a few inputs were refused
with the wrong error. The rest: stale handles on reused fd numbers, no fd or mapping leaks,
calls from another thread, huge and failing event iterables, the kernel's UCNA path."""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import threading
import time
import tracemalloc

import pytest

from kvm_bindings import KvmError, ShutdownExit, StaleHandleError, TprAccessExit, abi
from kvm_bindings.snapshot import VmState
from kvm_bindings.testing import MEMORY_SIZE, Sync, load_guest, ucalls
from kvm_bindings.testing import assemble as kit_assemble
from kvm_bindings.x86 import X86Vm, mce

CORRECTED = mce.MCI_STATUS_VAL | mce.MCI_STATUS_EN | mce.MCI_STATUS_ADDRV | 0x009F
UNCORRECTED = mce.MCI_STATUS_VAL | mce.MCI_STATUS_UC | mce.MCI_STATUS_EN | mce.MCI_STATUS_PCC \
    | mce.MCI_STATUS_ADDRV | 0x0134
ALL_ONES = 2**64 - 1
VAPIC = 0x80000
TPR = 0x80


class _Index:
    """An integer that is not an int (numpy.uint64, a ctypes-backed enum...): __index__ only."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def _with_cr4_mce(vcpu) -> None:
    sregs = vcpu.get_sregs()
    sregs.cr4 |= 1 << 6
    vcpu.set_sregs(sregs)


def _bank(vcpu, bank: int) -> tuple[int, int, int, int]:
    msrs = [mce.msr_mc_ctl(bank), mce.msr_mc_status(bank), mce.msr_mc_addr(bank),
            mce.msr_mc_misc(bank)]
    got = vcpu.get_msrs(msrs)
    return tuple(got[m] for m in msrs)


def _lapic_tpr(vcpu) -> int:
    at = abi.kvm_lapic_state.regs.offset + TPR
    return int.from_bytes(bytes(vcpu.get_lapic())[at:at + 4], "little")


# ==== snapshots: what setup_mce, inject_mce, set_vapic_addr and set_tpr_access_reporting
# ==== leave in the kernel is per-vCPU state that save_state() does not read =================

def test_a_vm_whose_vcpu_was_given_mcg_ctl_p_can_be_restored(kvm, vm):
    # MCG_CTL_P is in every KVM's get_mce_cap_supported(). save_state() reads IA32_MCG_CTL
    # (all ones, from setup_mce) but not IA32_MCG_CAP, so the new vCPU lacks MCG_CTL_P and
    # the kernel refused the write: restore_vm() raised RestoreError.
    assert kvm.get_mce_cap_supported() & mce.MCG_CTL_P
    vcpu = vm.create_vcpu(0)
    vcpu.setup_mce(4 | mce.MCG_CTL_P)
    with kvm.restore_vm(vm.save_state()) as copy:
        assert copy.vcpus[0].get_msrs([mce.MSR_IA32_MCG_CAP, mce.MSR_IA32_MCG_CTL]) == {
            mce.MSR_IA32_MCG_CAP: 4 | mce.MCG_CTL_P, mce.MSR_IA32_MCG_CTL: ALL_ONES}


def test_a_restored_vcpu_has_the_banks_setup_mce_gave_it(kvm, vm):
    # Once lost: MCG_CAP comes back as KVM's default (32 banks) and every bank's CTL as 0,
    # so an uncorrected error the original would take is silently dropped by the copy.
    vcpu = vm.create_vcpu(0)
    vcpu.setup_mce(4)
    with kvm.restore_vm(vm.save_state()) as copy:
        restored = copy.vcpus[0]
        assert restored.get_msrs([mce.MSR_IA32_MCG_CAP]) == {mce.MSR_IA32_MCG_CAP: 4}
        assert [_bank(restored, b)[0] for b in range(4)] == [ALL_ONES] * 4


def test_a_restored_vcpu_still_holds_the_error_in_its_bank(kvm, vm):
    # A corrected error waiting in bank 2 for the guest to poll: IA32_MC2_STATUS/ADDR are
    # not in KVM_GET_MSR_INDEX_LIST, so save_state() never reads them; the copy's bank is empty.
    vcpu = vm.create_vcpu(0)
    vcpu.setup_mce(4)
    assert vcpu.inject_mce(2, CORRECTED, addr=0x5000, misc=0x86)
    held = _bank(vcpu, 2)
    with kvm.restore_vm(vm.save_state()) as copy:
        assert _bank(copy.vcpus[0], 2) == held


def test_load_state_puts_the_banks_back_as_they_were_saved(vm):
    vcpu = vm.create_vcpu(0)
    vcpu.setup_mce(4)
    saved = vm.save_state()
    vcpu.inject_mce(2, CORRECTED, addr=0x5000)       # after the snapshot
    vm.load_state(saved)
    assert _bank(vcpu, 2) == (ALL_ONES, 0, 0, 0)     # (the later error once survived the load)


def _apic_vm(kvm, source: str):
    vm = kvm.create_vm()
    vm.set_tss_addr(0xFFFBD000)
    vm.create_irqchip()
    vm.add_memory(0, MEMORY_SIZE)
    vcpu = vm.create_vcpu(0)
    load_guest(vcpu, kit_assemble(source, mode="protected"), mode="protected")
    return vm, vcpu


def _run_from_snapshot(kvm, source: str, setup, handler=None):
    """Run the guest to its first Sync (0x1111), snapshot it, and run the original and a
    restored copy on from there: (the original's later syncs, the copy's, the TPR access
    exits each saw)."""
    vm, vcpu = _apic_vm(kvm, source)
    with vm:
        setup(vcpu)
        events = ucalls(vcpu, timeout=10, handler=handler and handler("original"))
        first = next(events)
        assert isinstance(first, Sync) and first.value == 0x1111
        state = vm.save_state()
        original = [e.value for e in events if isinstance(e, Sync)]
    with kvm.restore_vm(state) as copy:
        restored = [e.value for e in ucalls(copy.vcpus[0], timeout=10,
                                            handler=handler and handler("copy"))
                    if isinstance(e, Sync)]
    return original, restored


VAPIC_GUEST = r"""
    mov     $0xfee00000, %esi
    movl    $0x1ff, 0xf0(%esi)          /* the APIC on */
    GUEST_SYNC($0x1111)                 /* the host snapshots here */
    movl    $0x70, 0x80000              /* a plain store to the vapic word raises the TPR */
    GUEST_SYNC($0)                      /* KVM takes it at an exit (here: one late) */
    GUEST_SYNC($0)
    mov     0x80(%esi), %eax
    GUEST_SYNC(%eax)                    /* the TPR the APIC has now */
    GUEST_DONE
"""


def test_a_restored_vcpu_keeps_its_vapic_address(kvm):
    original, restored = _run_from_snapshot(kvm, VAPIC_GUEST, lambda v: v.set_vapic_addr(VAPIC))
    assert original[-1] == 0x70           # the oracle: the guest's store reaches the APIC
    assert restored[-1] == 0x70           # (once 0: the copy had no vapic address)


TPR_GUEST = r"""
    mov     $0xfee00000, %esi
    movl    $0x1ff, 0xf0(%esi)
    GUEST_SYNC($0x1111)                 /* the host snapshots here */
    mov     0x80(%esi), %eax            /* a TPR read through the APIC page */
    GUEST_SYNC($0xaaaa)
    GUEST_SYNC($0xbbbb)                 /* reported by here at the latest (one exit late) */
    GUEST_DONE
"""


def test_a_restored_vcpu_keeps_reporting_tpr_accesses(kvm):
    seen: dict[str, int] = {"original": 0, "copy": 0}

    def handler(which):
        def handle(exit):
            if isinstance(exit, TprAccessExit):
                seen[which] += 1
                return True
            return False
        return handle
    _run_from_snapshot(kvm, TPR_GUEST, lambda v: v.set_tpr_access_reporting(True), handler)
    assert seen["original"] == 1          # the oracle
    assert seen["copy"] == 1              # (once 0: reporting was off in the copy)


# ==== inject_mce's answer ====================================================================

def test_inject_mce_is_false_when_an_identical_uncorrected_error_shuts_the_vcpu_down(vm):
    # The kernel drops the second one (a machine check is in progress: MCG_STATUS_MCIP) and
    # shuts the vCPU down; the bank still holds the first, identical, status, and
    # inject_mce compared only the bank with the status and answered True.
    vcpu = vm.create_vcpu(0)
    vcpu.setup_mce(4)
    _with_cr4_mce(vcpu)
    assert vcpu.inject_mce(1, UNCORRECTED)
    assert not vcpu.inject_mce(1, UNCORRECTED)
    vm.memory.write(0x1000, b"\xf4")                 # hlt
    regs = vcpu.get_regs()
    regs.rip = 0x1000
    vcpu.set_regs(regs)
    assert isinstance(vcpu.run(), ShutdownExit)      # the oracle: the second one shut it down


def test_inject_mce_takes_integers_that_are_not_ints_as_setup_mce_does(vm):
    # fill() takes an __index__ value, but the checks after it use the raw argument
    # (status & MCI_STATUS_VAL, bank >= banks): it was TypeError "unsupported operand".
    vcpu = vm.create_vcpu(0)
    vcpu.setup_mce(_Index(4))                        # accepted here
    assert vcpu.inject_mce(_Index(2), _Index(CORRECTED))
    assert _bank(vcpu, 2)[1] == CORRECTED


def test_an_uncorrected_error_without_mcg_status_is_kept_with_reporting_off_and_no_mc(vm):
    # Pins the kernel's UCNA path (uncorrected, no PCC/S/AR, mcg_status 0): the bank keeps it
    # even while reporting is off, and no #MC is raised. inject_mce's docstring says an
    # uncorrected error "raises #MC" and "is left out while reporting is off": not for this one.
    vcpu = vm.create_vcpu(0)                         # banks off: no setup_mce()
    ucna = mce.MCI_STATUS_VAL | mce.MCI_STATUS_UC | mce.MCI_STATUS_EN | 0x0134
    assert vcpu.inject_mce(1, ucna, mcg_status=0)
    assert _bank(vcpu, 1)[1] == ucna
    events = vcpu.get_vcpu_events()
    assert not events.exception.pending and not events.exception.injected


def test_setup_mce_passes_the_extended_msr_count_bits_through(vm):
    # setup_mce's comment: the kernel lets bits 16-23 through; so does setup_mce, and the
    # vCPU keeps them in IA32_MCG_CAP.
    vcpu = vm.create_vcpu(0)
    vcpu.setup_mce(2 | (5 << 16))
    assert vcpu.get_msrs([mce.MSR_IA32_MCG_CAP]) == {mce.MSR_IA32_MCG_CAP: 2 | (5 << 16)}


# ==== stale handles ============================================================================

def _calls(kvm, vm, vcpu):
    """(the object whose closing makes the call stale, the call)."""
    return {
        "get_mce_cap_supported": ("kvm", kvm.get_mce_cap_supported),
        "setup_mce": ("vcpu", lambda: vcpu.setup_mce(2)),
        "inject_mce": ("vcpu", lambda: vcpu.inject_mce(1, CORRECTED)),
        "set_vapic_addr(0)": ("vcpu", lambda: vcpu.set_vapic_addr(0)),
        "set_tpr_access_reporting": ("vcpu", lambda: vcpu.set_tpr_access_reporting(True)),
        "set_cpuid": ("vcpu", lambda: vcpu.set_cpuid(abi.kvm_cpuid.alloc(0))),
        "set_pmu_event_filter": ("vm", lambda: vm.set_pmu_event_filter(abi.KVM_PMU_EVENT_DENY,
                                                                        [0xC0])),
    }


@pytest.mark.parametrize("closing", ["vcpu", "vm", "kvm"])
def test_every_call_on_a_closed_handle_is_stale_even_when_its_fd_number_was_reused(closing):
    from kvm_bindings import Kvm
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.create_irqchip()
    vm.add_memory(0, 0x10000)
    vcpu = vm.create_vcpu(0)
    numbers = {"vcpu": [vcpu.fd], "vm": [vm.fd, vcpu.fd], "kvm": [kvm.fd, vm.fd, vcpu.fd]}[closing]
    {"vcpu": vcpu, "vm": vm, "kvm": kvm}[closing].close()
    if closing == "kvm":
        vm.close()                                   # a VM outlives its Kvm: close it too
    reused = []
    while not all(n in reused for n in numbers):     # every freed number now names a pipe
        reused.extend(os.pipe())
    try:
        closed = {"vcpu": {"vcpu"}, "vm": {"vm", "vcpu"}, "kvm": {"kvm", "vm", "vcpu"}}[closing]
        for owner, call in _calls(kvm, vm, vcpu).values():
            if owner in closed:
                with pytest.raises(StaleHandleError):
                    call()
        os.write(reused[1], b"ok")
        assert os.read(reused[0], 2) == b"ok"        # the pipes were never touched
    finally:
        for fd in reused:
            os.close(fd)
        vm.close()
        kvm.close()


@pytest.mark.parametrize("closing", ["vcpu", "vm"])
def test_set_vapic_addr_on_a_closed_handle_is_stale_not_a_guest_memory_error(kvm, closing):
    # The memory check comes before any liveness check: a vCPU of a closed VM is told that
    # "the VM has no memory; add some with vm.add_memory()" (GuestMemoryError).
    vm = kvm.create_vm()
    vm.create_irqchip()
    vm.add_memory(0, 0x10000)
    vcpu = vm.create_vcpu(0)
    (vcpu if closing == "vcpu" else vm).close()
    try:
        with pytest.raises(StaleHandleError):
            vcpu.set_vapic_addr(0x20000 if closing == "vcpu" else 0x1000)
    finally:
        vm.close()


# ==== resources and threads ======================================================================

def _fds_and_maps() -> tuple[int, int]:
    with open("/proc/self/maps") as maps:
        return len(os.listdir("/proc/self/fd")), sum(1 for _ in maps)


def _cycle(kvm) -> None:
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        vm.add_memory(0, 0x10000)
        vcpu = vm.create_vcpu(0)
        vcpu.setup_mce(4)
        vcpu.inject_mce(1, CORRECTED)
        vcpu.set_vapic_addr(0x8000)
        vcpu.set_tpr_access_reporting(True)
        vm.set_pmu_event_filter(abi.KVM_PMU_EVENT_DENY, [0xC0])
        with pytest.raises(KvmError):
            vm.set_pmu_event_filter(abi.KVM_PMU_EVENT_DENY, range(400))
        kvm.restore_vm(vm.save_state()).close()


def test_the_new_calls_and_their_restores_leak_no_fd_or_mapping(kvm):
    _cycle(kvm)
    gc.collect()
    before = _fds_and_maps()
    for _ in range(30):
        _cycle(kvm)
    gc.collect()
    assert _fds_and_maps() == before


def test_a_call_from_another_thread_waits_for_the_running_vcpu_then_lands(vm):
    vm.add_memory(0x10000, MEMORY_SIZE - 0x10000)
    vcpu = vm.create_vcpu(0)
    vcpu.setup_mce(4)
    load_guest(vcpu, kit_assemble("1: jmp 1b\n"))
    exits: list = []
    runner = threading.Thread(target=lambda: exits.append(vcpu.run()))
    runner.start()
    time.sleep(0.1)
    answers: list = []
    caller = threading.Thread(target=lambda: answers.append(vcpu.inject_mce(2, CORRECTED)))
    caller.start()
    caller.join(0.3)
    assert caller.is_alive() and not answers        # the kernel holds it behind KVM_RUN
    vcpu.kick()
    runner.join(5)
    caller.join(5)
    assert answers == [True] and _bank(vcpu, 2)[1] == CORRECTED


# ==== set_pmu_event_filter's events ===============================================================

@pytest.mark.parametrize("events", [bytearray(b"\xc0\x76"), memoryview(b"\xc0\x76")],
                         ids=["bytearray", "memoryview"])
def test_set_pmu_event_filter_refuses_byte_buffers_as_it_refuses_bytes(vm, events):
    # bytes and str are refused ("an iterable of ints, not bytes"); a bytearray or memoryview
    # is the same mistake and became events [0xc0, 0x76].
    with pytest.raises(TypeError, match="iterable of ints"):
        vm.set_pmu_event_filter(abi.KVM_PMU_EVENT_DENY, events)
    assert "pmu_event_filter" not in vm._setup


def test_an_events_iterable_that_fails_midway_changes_nothing(vm, monkeypatch):
    vm.set_pmu_event_filter(abi.KVM_PMU_EVENT_DENY, [0xC0])
    before = vm._setup["pmu_event_filter"]
    issued: list = []
    monkeypatch.setattr(vm, "ioctl", lambda *a, **k: issued.append(a))

    def events():
        yield 0x76
        raise RuntimeError("the caller's generator broke")
    with pytest.raises(RuntimeError, match="generator broke"):
        vm.set_pmu_event_filter(abi.KVM_PMU_EVENT_ALLOW, events())
    assert issued == [] and vm._setup["pmu_event_filter"] == before


def test_a_million_events_are_the_kernels_e2big_in_bounded_memory(vm):
    tracemalloc.start()
    try:
        with pytest.raises(KvmError, match="1000000 events are more than") as e:
            vm.set_pmu_event_filter(abi.KVM_PMU_EVENT_DENY, range(10**6))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.errno == errno.E2BIG
    assert peak < 128 * 2**20               # ~48 MB here: the list plus an 8 MB filter
    assert "pmu_event_filter" not in vm._setup


def test_a_restore_issues_the_filter_to_the_kernel_through_a_serialized_snapshot(kvm, vm,
                                                                                 monkeypatch):
    # Stronger than comparing _setup: the bytes KVM_SET_PMU_EVENT_FILTER carries in the copy.
    vm.set_pmu_event_filter(abi.KVM_PMU_EVENT_ALLOW, [0xC0, 0x76], fixed_counter_bitmap=0b10)
    vm.create_vcpu(0)
    state = VmState.from_bytes(vm.save_state().to_bytes())
    sent: list = []
    real = X86Vm.ioctl

    def spy(self, number, arg=None, **kw):
        if number == abi.KVM_SET_PMU_EVENT_FILTER:
            head = abi.IOCTLS["KVM_SET_PMU_EVENT_FILTER"].size
            nevents = int.from_bytes(ctypes.string_at(
                ctypes.addressof(arg) + abi.kvm_pmu_event_filter.nevents.offset, 4), "little")
            sent.append(ctypes.string_at(ctypes.addressof(arg), head + 8 * nevents))
        return real(self, number, arg, **kw)
    monkeypatch.setattr(X86Vm, "ioctl", spy)
    with kvm.restore_vm(state):
        pass
    [raw] = sent
    f = abi.kvm_pmu_event_filter

    def u32(name):
        return int.from_bytes(raw[getattr(f, name).offset:][:4], "little")
    assert (u32("action"), u32("nevents"), u32("fixed_counter_bitmap"), u32("flags")) == (
        abi.KVM_PMU_EVENT_ALLOW, 2, 0b10, 0)
    events = raw[f.events.offset:]
    assert [int.from_bytes(events[i:i + 8], "little") for i in (0, 8)] == [0xC0, 0x76]


# ==== set_cpuid's refusal ==========================================================================

def test_set_cpuid_says_plainly_when_there_are_more_entries_than_kvm_takes(vm):
    # KVM takes at most KVM_MAX_CPUID_ENTRIES (256) leaves; the message was the bare
    # "KVM_SET_CPUID failed: Argument list too long", not what to do about it
    # (set_pmu_event_filter says "N events are more than this kernel takes").
    vcpu = vm.create_vcpu(0)
    with pytest.raises(KvmError, match="257 entries") as e:
        vcpu.set_cpuid(abi.kvm_cpuid.alloc(257))
    assert e.value.errno == errno.E2BIG
