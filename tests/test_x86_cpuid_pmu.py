"""The legacy KVM_SET_CPUID, seen by a guest's CPUID and by KVM_GET_CPUID2; and
KVM_SET_PMU_EVENT_FILTER, checked by the kernel's own validation and, where the host gives
guests a working PMU, by a guest's counter."""

from __future__ import annotations

import ctypes
import errno

import pytest

from kvm_bindings import KvmError, KvmUnsupported, abi
from kvm_bindings.testing import MEMORY_SIZE, Sync, load_guest, ucalls
from kvm_bindings.testing import assemble as kit_assemble

from .conftest import no_ioctls

SIGNATURE = b"PyKvmLegacy!"


def _kit_vcpu(vm):
    vm.add_memory(0x10000, MEMORY_SIZE - 0x10000)
    return vm.create_vcpu(0)


def _syncs(vcpu, **kw):
    return [e.value for e in ucalls(vcpu, timeout=10, **kw) if isinstance(e, Sync)]




def _legacy_cpuid(kvm) -> abi.kvm_cpuid:
    """The host's supported leaves, first subleaf of each, in the legacy layout."""
    leaves = {}
    for e in kvm.get_supported_cpuid().flex_array():
        leaves.setdefault(e.function, e)
    cpuid = abi.kvm_cpuid.alloc(len(leaves))
    for slot, e in zip(cpuid.flex_array(), leaves.values()):
        slot.function, slot.eax, slot.ebx, slot.ecx, slot.edx = e.function, e.eax, e.ebx, e.ecx, e.edx
    return cpuid


# ---- KVM_SET_CPUID ---------------------------------------------------------------------------

def test_set_cpuid_is_what_the_guest_reads_and_get_cpuid2_returns(kvm, vm):
    vcpu = _kit_vcpu(vm)
    load_guest(vcpu, kit_assemble(r"""
        mov     $0x40000000, %eax
        cpuid
        GUEST_SYNC(%rbx)
        GUEST_SYNC(%rcx)
        GUEST_SYNC(%rdx)
        GUEST_DONE
    """))
    cpuid = _legacy_cpuid(kvm)
    [hv] = [e for e in cpuid.flex_array() if e.function == 0x40000000]
    hv.ebx, hv.ecx, hv.edx = (int.from_bytes(SIGNATURE[i:i + 4], "little") for i in (0, 4, 8))
    vcpu.set_cpuid(cpuid)              # replaces the leaves load_guest() set
    assert b"".join(v.to_bytes(4, "little") for v in _syncs(vcpu)) == SIGNATURE
    # KVM keeps each leaf as subleaf 0 (it adjusts some it computes itself, such as 1 and 0xd).
    back = vcpu.get_cpuid2().flex_array()
    assert sorted((e.function, e.index) for e in back) \
        == sorted((e.function, 0) for e in cpuid.flex_array())
    [hv_back] = [e for e in back if e.function == 0x40000000]
    assert (hv_back.ebx, hv_back.ecx, hv_back.edx) == (hv.ebx, hv.ecx, hv.edx)


def test_set_cpuid_takes_only_a_kvm_cpuid_that_holds_its_entries(vm, monkeypatch):
    vcpu = vm.create_vcpu(0)
    issued = no_ioctls(monkeypatch, vcpu)
    for wrong in (abi.kvm_cpuid2.alloc(1), [(0, 0, 0, 0, 0)], None):
        with pytest.raises(TypeError, match="kvm_cpuid"):
            vcpu.set_cpuid(wrong)
    short = abi.kvm_cpuid.alloc(1)
    short.nent = 2
    with pytest.raises(ValueError, match="claims more entries"):
        vcpu.set_cpuid(short)
    assert issued == []


def test_set_cpuid_sends_the_legacy_layout(vm, monkeypatch):
    vcpu = vm.create_vcpu(0)
    cpuid = abi.kvm_cpuid.alloc(2)
    for slot, values in zip(cpuid.flex_array(), [(1, 2, 3, 4, 5), (0x80000001, 6, 7, 8, 9)]):
        slot.function, slot.eax, slot.ebx, slot.ecx, slot.edx = values
    issued = no_ioctls(monkeypatch, vcpu)
    vcpu.set_cpuid(cpuid)
    [(number, sent)] = issued
    assert number == abi.KVM_SET_CPUID and sent is cpuid
    raw = ctypes.string_at(ctypes.addressof(sent), ctypes.sizeof(abi.kvm_cpuid)
                           + 2 * ctypes.sizeof(abi.kvm_cpuid_entry))
    assert int.from_bytes(raw[abi.kvm_cpuid.nent.offset:][:4], "little") == 2
    entry = ctypes.sizeof(abi.kvm_cpuid_entry)
    second = raw[abi.kvm_cpuid.entries.offset + entry:][:entry]
    assert [int.from_bytes(second[getattr(abi.kvm_cpuid_entry, f).offset:][:4], "little")
            for f in ("function", "eax", "ebx", "ecx", "edx")] == [0x80000001, 6, 7, 8, 9]


# ---- KVM_SET_PMU_EVENT_FILTER: what the kernel takes -------------------------------------------

def test_the_kernel_takes_the_filters_set_pmu_event_filter_builds(vm, monkeypatch):
    real, sent = vm.ioctl, []

    def spy(number, arg=None, **kw):         # passes each call on to the kernel
        sent.append(number)
        return real(number, arg, **kw)
    monkeypatch.setattr(vm, "ioctl", spy)
    vm.set_pmu_event_filter(abi.KVM_PMU_EVENT_DENY, [0xC0, 0x76, 0x01C2])
    vm.set_pmu_event_filter(abi.KVM_PMU_EVENT_ALLOW, [])          # counts nothing
    vm.set_pmu_event_filter(abi.KVM_PMU_EVENT_DENY, iter(range(0x10, 0x20)))
    assert sent.count(abi.KVM_SET_PMU_EVENT_FILTER) == 3
    assert vm._setup["pmu_event_filter"] == ("set_pmu_event_filter", {
        "action": abi.KVM_PMU_EVENT_DENY, "events": list(range(0x10, 0x20)),
        "fixed_counter_bitmap": 0, "flags": 0})


def test_an_action_the_kernel_refuses_is_refused_first(vm, monkeypatch):
    filt = abi.kvm_pmu_event_filter.alloc(0)
    filt.action = 2
    with pytest.raises(KvmError) as kernel:
        vm.ioctl(abi.KVM_SET_PMU_EVENT_FILTER, filt)
    assert kernel.value.errno == errno.EINVAL
    issued = no_ioctls(monkeypatch, vm)
    with pytest.raises(ValueError, match="KVM_PMU_EVENT_ALLOW or KVM_PMU_EVENT_DENY, not 2"):
        vm.set_pmu_event_filter(2, [0xC0])
    with pytest.raises(ValueError, match="unknown flags 0x2"):
        vm.set_pmu_event_filter(abi.KVM_PMU_EVENT_DENY, [0xC0], flags=2)
    for events, kind in (("C0", TypeError), (0xC0, TypeError), ([0xC0, -1], OverflowError),
                         ([2**64], OverflowError), (["0xc0"], TypeError)):
        with pytest.raises(kind):
            vm.set_pmu_event_filter(abi.KVM_PMU_EVENT_DENY, events)
    assert issued == []


def test_too_many_events_is_the_kernels_e2big_said_plainly(vm):
    with pytest.raises(KvmError, match="10000 events are more than this kernel takes") as e:
        vm.set_pmu_event_filter(abi.KVM_PMU_EVENT_DENY, range(10000))
    assert e.value.errno == errno.E2BIG
    assert "pmu_event_filter" not in vm._setup


def test_the_filter_sent_is_the_generated_layout_with_its_events_after(vm, monkeypatch):
    monkeypatch.setattr(vm, "check_extension", lambda c: 1)     # (it is an ioctl too)
    issued = no_ioctls(monkeypatch, vm)
    vm.set_pmu_event_filter(abi.KVM_PMU_EVENT_DENY, [0x11, 0x2233, 2**64 - 1],
                            fixed_counter_bitmap=0b101)
    [(number, filt)] = issued
    assert number == abi.KVM_SET_PMU_EVENT_FILTER
    head = abi.IOCTLS["KVM_SET_PMU_EVENT_FILTER"].size         # the kernel copies this first
    raw = ctypes.string_at(ctypes.addressof(filt), head + 3 * 8)

    def u32(name):
        return int.from_bytes(raw[getattr(abi.kvm_pmu_event_filter, name).offset:][:4], "little")
    assert (u32("action"), u32("nevents"), u32("fixed_counter_bitmap"), u32("flags")) \
        == (abi.KVM_PMU_EVENT_DENY, 3, 0b101, 0)
    events = raw[abi.kvm_pmu_event_filter.events.offset:]
    assert [int.from_bytes(events[i:i + 8], "little") for i in (0, 8, 16)] == [0x11, 0x2233, 2**64 - 1]


def test_masked_events_need_their_capability(vm, monkeypatch):
    answers = {c: vm.check_extension(c) for c in abi.Capability}

    def real(c):
        return answers[c]
    monkeypatch.setattr(vm, "check_extension",
                        lambda c: 0 if c == abi.Capability.PMU_EVENT_MASKED_EVENTS else real(c))
    issued = no_ioctls(monkeypatch, vm)
    with pytest.raises(KvmUnsupported, match="KVM_CAP_PMU_EVENT_MASKED_EVENTS"):
        vm.set_pmu_event_filter(abi.KVM_PMU_EVENT_DENY, [0],
                                flags=abi.KVM_PMU_EVENT_FLAG_MASKED_EVENTS)
    monkeypatch.setattr(vm, "check_extension",
                        lambda c: 0 if c == abi.Capability.PMU_EVENT_FILTER else real(c))
    with pytest.raises(KvmUnsupported, match="KVM_CAP_PMU_EVENT_FILTER"):
        vm.set_pmu_event_filter(abi.KVM_PMU_EVENT_DENY, [0xC0])
    assert issued == []


def test_a_restore_sets_the_filter_again(kvm, vm):
    vm.set_pmu_event_filter(abi.KVM_PMU_EVENT_DENY, [0xC0, 0x76])
    vm.create_vcpu(0)
    with kvm.restore_vm(vm.save_state()) as copy:
        assert copy._setup["pmu_event_filter"] == vm._setup["pmu_event_filter"]


# ---- a guest's counter ------------------------------------------------------------------------

def _counting_guest(kvm) -> str:
    """A guest counting retired instructions in general-purpose counter 0 over a loop, in
    this vendor's MSRs (AMD PerfEvtSel0/PerfCtr0, else Intel IA32_PERFEVTSEL0/IA32_PMC0)."""
    [leaf0] = [e for e in kvm.get_supported_cpuid().flex_array() if e.function == 0]
    amd = leaf0.ebx.to_bytes(4, "little") == b"Auth"
    select, counter = (0xC0010000, 0xC0010004) if amd else (0x186, 0xC1)
    return rf"""
        mov     ${select}, %ecx
        mov     $((1 << 22) | (1 << 17) | (1 << 16) | 0xc0), %eax   /* EN, OS, USR; event 0xc0 */
        xor     %edx, %edx
        wrmsr
        mov     $1000, %ebx
    1:  dec     %ebx
        jnz     1b
        mov     ${counter}, %ecx
        rdmsr
        GUEST_SYNC(%rax)
        GUEST_DONE
    """


def _count(kvm, action=None, events=()):
    with kvm.create_vm() as vm:
        vm.set_tss_addr(0xFFFBD000)
        vm.add_memory(0, MEMORY_SIZE)
        if action is not None:
            vm.set_pmu_event_filter(action, events)
        vcpu = vm.create_vcpu(0)
        load_guest(vcpu, kit_assemble(_counting_guest(kvm)))
        [count] = _syncs(vcpu)
        return count


def test_a_guest_counter_counts_only_what_the_filter_lets_through(kvm):
    if _count(kvm) == 0:
        pytest.skip("this host's KVM gives guests no working PMU (retired instructions count "
                    "0 with no filter), so no filter can be seen in a counter")
    assert _count(kvm, abi.KVM_PMU_EVENT_ALLOW, [0xC0]) >= 1000
    assert _count(kvm, abi.KVM_PMU_EVENT_DENY, [0xC0]) == 0
    assert _count(kvm, abi.KVM_PMU_EVENT_ALLOW, [0x76]) == 0
