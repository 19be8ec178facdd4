"""The x86 VM and vCPU calls of issue 14's first slice: shadow MMU size, the legacy PIT,
PIT tick reinjection and pre-faulting guest memory."""

from __future__ import annotations

import ctypes
import errno

import pytest

from kvm_bindings import GuestMemoryError, KvmError, KvmUnsupported, abi
from kvm_bindings.testing import MEMORY_SIZE, GuestTimeoutError, load_guest, run_guest
from kvm_bindings.testing import assemble as kit_assemble

from .conftest import no_ioctls, without_capability


def _kit_vcpu(vm):
    """vCPU 0 of vm, its RAM grown from the fixture's 64 KiB to the kit's layout (2 MiB)."""
    vm.add_memory(0x10000, MEMORY_SIZE - 0x10000)
    return vm.create_vcpu(0)






# ---- KVM_SET_NR_MMU_PAGES / KVM_GET_NR_MMU_PAGES ------------------------------------------

def test_the_kernel_takes_64_mmu_pages_and_refuses_63_as_set_nr_mmu_pages_does(vm):
    vm.set_nr_mmu_pages(64)
    with pytest.raises(KvmError) as kernel:
        vm.ioctl(abi.KVM_SET_NR_MMU_PAGES, 63)          # past our check: the kernel's own
    assert kernel.value.errno == errno.EINVAL
    with pytest.raises(ValueError, match="at least 64"):
        vm.set_nr_mmu_pages(63)


@pytest.mark.parametrize("bad, kind", [("128", TypeError), (True, TypeError), (1.5, TypeError),
                                       (-1, OverflowError), (2**64, OverflowError)])
def test_set_nr_mmu_pages_refuses_what_is_not_an_unsigned_long(vm, monkeypatch, bad, kind):
    issued = no_ioctls(monkeypatch, vm)
    with pytest.raises(kind):
        vm.set_nr_mmu_pages(bad)
    assert issued == []


def test_get_nr_mmu_pages_says_the_kernel_withdrew_it(vm):
    vm.set_nr_mmu_pages(200)
    try:
        pages = vm.get_nr_mmu_pages()
    except KvmError as e:
        assert e.errno == errno.ENOTTY and e.ioctl == "KVM_GET_NR_MMU_PAGES"
        assert "withdrawn upstream" in str(e) and "KVM_SET_NR_MMU_PAGES" in str(e)
    else:                                   # a kernel that still has it reports what was set
        assert pages == 200


def test_get_nr_mmu_pages_passes_other_errors_through(vm, monkeypatch):
    def refuse(number, arg=None, *, name=None):
        raise KvmError("KVM_GET_NR_MMU_PAGES", errno.EIO)
    monkeypatch.setattr(vm, "ioctl", refuse)
    with pytest.raises(KvmError) as e:
        vm.get_nr_mmu_pages()
    assert e.value.errno == errno.EIO and "withdrawn" not in str(e.value)


# ---- the legacy PIT ----------------------------------------------------------------------

def test_create_pit_needs_the_in_kernel_pic_and_says_so(vm):
    with pytest.raises(KvmError, match="create_irqchip") as e:
        vm.create_pit()
    assert e.value.errno == errno.ENOENT


@pytest.mark.parametrize("first, second", [("create_pit", "create_pit2"),
                                           ("create_pit2", "create_pit")])
def test_one_pit_per_vm_whichever_call_makes_it(vm, first, second):
    vm.create_irqchip()
    getattr(vm, first)()
    with pytest.raises(KvmError, match="one per VM") as e:
        getattr(vm, second)()
    assert e.value.errno == errno.EEXIST


def test_pit_state_round_trips_and_kvm_get_pit2_reports_the_same(vm):
    vm.create_irqchip()
    vm.create_pit()
    pit = vm.get_pit()
    speaker = pit.channels[2]               # channel 2: no interrupt to fire while we look
    assert (speaker.count, speaker.mode) != (0x1234, 3)
    speaker.count, speaker.mode, speaker.rw_mode = 0x1234, 3, 3
    vm.set_pit(pit)

    def seen(channels):
        # count_load_time is stamped again by the load: compared field by field without it
        return [(c.count, c.mode, c.rw_mode, c.gate, c.bcd) for c in channels]
    assert seen(vm.get_pit().channels) == seen(pit.channels)
    assert seen(vm.get_pit2().channels) == seen(pit.channels)


def test_set_pit_reaches_a_pit_made_by_create_pit2(vm):
    vm.create_irqchip()
    vm.create_pit2()
    pit = vm.get_pit()
    pit.channels[2].count = 0x4321
    vm.set_pit(pit)
    assert vm.get_pit2().channels[2].count == 0x4321


def test_pit_calls_without_a_pit_say_what_to_create(vm):
    vm.create_irqchip()
    with pytest.raises(KvmError, match="no in-kernel PIT") as e:
        vm.get_pit()
    assert e.value.errno == errno.ENXIO
    with pytest.raises(KvmError, match="no in-kernel PIT"):
        vm.set_pit(abi.kvm_pit_state())


def test_set_pit_takes_only_a_kvm_pit_state(vm, monkeypatch):
    issued = no_ioctls(monkeypatch, vm)
    for wrong in (abi.kvm_pit_state2(), bytes(ctypes.sizeof(abi.kvm_pit_state)), None):
        with pytest.raises(TypeError, match="kvm_pit_state"):
            vm.set_pit(wrong)
    assert issued == []


# A real-mode guest that counts timer ticks: IRQ 0 through the master PIC at vector 0x20.
# The PIT is left as reset (no channel counting) for the host to program with set_pit().
COUNTS_TICKS = """
    cli
    movw    $tick, (0x20 * 4)           // IVT entry 0x20: offset
    movw    $0, (0x20 * 4 + 2)          //                 segment
    mov     $0x11, %al                  // ICW1: edge, cascade, ICW4 follows
    out     %al, $0x20
    mov     $0x20, %al                  // ICW2: vectors 0x20..0x27
    out     %al, $0x21
    mov     $0x04, %al                  // ICW3: slave on IRQ 2
    out     %al, $0x21
    mov     $0x01, %al                  // ICW4: 8086 mode
    out     %al, $0x21
    mov     $0xfe, %al                  // only IRQ 0 (the PIT's channel 0)
    out     %al, $0x21
    xor     %bx, %bx                    // ticks seen
    sti
1:  hlt
    cmp     $3, %bx
    jb      1b
    cli
    GUEST_SYNC(%bx)
    GUEST_DONE
tick:
    inc     %bx
    mov     $0x20, %al                  // EOI
    out     %al, $0x20
    iret
"""


def _ticking_guest(vm):
    vm.create_irqchip()
    vm.create_pit()
    vcpu = _kit_vcpu(vm)
    load_guest(vcpu, kit_assemble(COUNTS_TICKS, mode="real"), mode="real")
    return vcpu


def test_a_guest_gets_the_timer_interrupts_set_pit_programs(vm):
    vcpu = _ticking_guest(vm)
    pit = vm.get_pit()
    timer = pit.channels[0]
    timer.mode, timer.rw_mode, timer.count = 2, 3, 0x1000    # rate generator, ~290 Hz
    vm.set_pit(pit)
    back = vm.get_pit()
    vm.set_pit(back)                                          # a second round trip
    assert (vm.get_pit().channels[0].mode, vm.get_pit().channels[0].count) == (2, 0x1000)
    [ticks] = (event.value for event in run_guest(vcpu, timeout=10))
    assert ticks == 3


def test_a_guest_waits_in_vain_without_the_pit_programmed(vm):
    """The control for the test above: the reset PIT's channel 0 does not count."""
    vcpu = _ticking_guest(vm)
    with pytest.raises(GuestTimeoutError):
        run_guest(vcpu, timeout=0.5)


# ---- KVM_REINJECT_CONTROL ----------------------------------------------------------------

def test_pit_reinject_is_accepted_with_the_in_kernel_pit(vm):
    vm.create_irqchip()
    vm.create_pit2()
    # The kernel has no call to read it back: what a restore replays is the last one made.
    for enabled in (False, True, False):
        vm.set_pit_reinject(enabled)
        assert [c for c in vm._setup.values() if c[0] == "set_pit_reinject"] == \
            [("set_pit_reinject", {"enabled": enabled})]


def test_pit_reinject_without_the_pit_says_to_create_it(vm):
    vm.create_irqchip()
    with pytest.raises(KvmError, match="no in-kernel PIT") as e:
        vm.set_pit_reinject(False)
    assert e.value.errno == errno.ENXIO
    assert not any(c[0] == "set_pit_reinject" for c in vm._setup.values())


@pytest.mark.parametrize("bad", [0, 1, None, "yes"])
def test_pit_reinject_takes_a_bool(vm, monkeypatch, bad):
    issued = no_ioctls(monkeypatch, vm)
    with pytest.raises(TypeError, match="bool"):
        vm.set_pit_reinject(bad)
    assert issued == []


def test_the_reinject_request_holds_the_flag_and_zeroed_padding(vm, monkeypatch):
    issued = no_ioctls(monkeypatch, vm)
    monkeypatch.setattr(vm, "check_extension", lambda cap: 1)
    vm.set_pit_reinject(True)
    [(number, req)] = issued
    assert number == abi.KVM_REINJECT_CONTROL and isinstance(req, abi.kvm_reinject_control)
    assert bytes(req) == b"\x01" + bytes(ctypes.sizeof(req) - 1)


# ---- snapshots of a VM set up with these calls ---------------------------------------------

def test_a_vm_with_the_legacy_pit_is_restored_with_its_pit_state_and_setup(kvm, vm):
    vm.create_irqchip()
    vm.create_pit()
    vm.set_pit_reinject(False)
    vm.set_nr_mmu_pages(128)
    pit = vm.get_pit()
    pit.channels[2].count, pit.channels[2].mode = 0x2345, 3
    vm.set_pit(pit)
    vm.create_vcpu(0)
    state = vm.save_state()
    assert state.values["setup"][-3:] == [["create_pit", {}],
                                          ["set_pit_reinject", {"enabled": False}],
                                          ["set_nr_mmu_pages", {"pages": 128}]]
    with kvm.restore_vm(state) as restored:
        got = restored.get_pit().channels[2]
        assert (got.count, got.mode) == (0x2345, 3)
        with pytest.raises(KvmError) as again:      # the restore made the PIT with create_pit
            restored.create_pit2()
        assert again.value.errno == errno.EEXIST
        assert [list(c) for c in restored._setup.values()] == \
            [list(c) for c in vm._setup.values()]
        restored.load_state(state)                  # same setup calls: accepted in place


# ---- KVM_PRE_FAULT_MEMORY ----------------------------------------------------------------

def test_pre_fault_memory_refuses_a_range_outside_guest_memory_before_any_ioctl(vm, monkeypatch):
    vcpu = vm.create_vcpu(0)
    issued = no_ioctls(monkeypatch, vm, vcpu)
    with pytest.raises(GuestMemoryError, match="0x10000"):
        vcpu.pre_fault_memory(0xF000, 0x2000)        # the fixture's RAM ends at 0x10000
    with pytest.raises(GuestMemoryError):
        vcpu.pre_fault_memory(0x100000, 0x1000)
    assert issued == []


@pytest.mark.parametrize("gpa, size, kind", [
    (0x800, 0x1000, ValueError), (0x1000, 0x800, ValueError), (0x1000, 0, ValueError),
    (-0x1000, 0x1000, OverflowError), (0x1000, 2**64, OverflowError), ("0", 0x1000, TypeError),
    (0x1000, 4096.0, TypeError)])
def test_pre_fault_memory_refuses_bad_ranges_before_any_ioctl(vm, monkeypatch, gpa, size, kind):
    vcpu = vm.create_vcpu(0)
    issued = no_ioctls(monkeypatch, vm, vcpu)
    with pytest.raises(kind):
        vcpu.pre_fault_memory(gpa, size)
    assert issued == []


def test_pre_fault_memory_goes_on_until_the_whole_range_is_mapped(vm, monkeypatch):
    """The kernel stops partway (success with size left, or EAGAIN having done nothing):
    the call asks again with the struct the kernel moved on."""
    vcpu = vm.create_vcpu(0)
    monkeypatch.setattr(vm, "check_extension", lambda cap: 1)
    seen = []
    answers = iter(["partial", "eagain", "partial", "rest"])

    def kernel(number, req=None, *, name=None):
        assert number == abi.KVM_PRE_FAULT_MEMORY
        seen.append((req.gpa, req.size, req.flags))
        answer = next(answers)
        if answer == "eagain":
            raise KvmError("KVM_PRE_FAULT_MEMORY", errno.EAGAIN)
        done = 0x1000 if answer == "partial" else req.size
        req.gpa, req.size = req.gpa + done, req.size - done
        return 0
    monkeypatch.setattr(vcpu, "ioctl", kernel)
    vcpu.pre_fault_memory(0x2000, 0x4000)
    assert seen == [(0x2000, 0x4000, 0), (0x3000, 0x3000, 0), (0x3000, 0x3000, 0),
                    (0x4000, 0x2000, 0)]


def test_pre_fault_memory_passes_other_errors_through(vm, monkeypatch):
    vcpu = vm.create_vcpu(0)
    monkeypatch.setattr(vm, "check_extension", lambda cap: 1)

    def refuse(number, req=None, *, name=None):
        raise KvmError("KVM_PRE_FAULT_MEMORY", errno.ENOENT)
    monkeypatch.setattr(vcpu, "ioctl", refuse)
    with pytest.raises(KvmError) as e:
        vcpu.pre_fault_memory(0x1000, 0x1000)
    assert e.value.errno == errno.ENOENT


WRITES_THE_PREFAULTED_PAGES = """
    movl    $0x600df00d, 0x100000
    movl    $0x600df00d, 0x13f000
    GUEST_SYNC(0)
    GUEST_DONE
"""


def test_a_guest_touches_pre_faulted_memory(vm):
    if not vm.check_extension(abi.Capability.PRE_FAULT_MEMORY):
        pytest.skip("this host does not report KVM_CAP_PRE_FAULT_MEMORY (it needs TDP: "
                    "EPT or NPT, not shadow paging)")
    vcpu = _kit_vcpu(vm)
    load_guest(vcpu, kit_assemble(WRITES_THE_PREFAULTED_PAGES))
    vcpu.pre_fault_memory(0x100000, 0x40000)
    run_guest(vcpu)
    assert vm.memory.read_int(0x13F000, 4) == 0x600DF00D


# ---- capabilities ------------------------------------------------------------------------

@pytest.mark.parametrize("cap, ioctl, call", [
    ("MMU_SHADOW_CACHE_CONTROL", "KVM_SET_NR_MMU_PAGES", lambda vm, vcpu: vm.set_nr_mmu_pages(64)),
    ("MMU_SHADOW_CACHE_CONTROL", "KVM_GET_NR_MMU_PAGES", lambda vm, vcpu: vm.get_nr_mmu_pages()),
    ("PIT", "KVM_CREATE_PIT", lambda vm, vcpu: vm.create_pit()),
    ("PIT", "KVM_GET_PIT", lambda vm, vcpu: vm.get_pit()),
    ("PIT", "KVM_SET_PIT", lambda vm, vcpu: vm.set_pit(abi.kvm_pit_state())),
    ("REINJECT_CONTROL", "KVM_REINJECT_CONTROL", lambda vm, vcpu: vm.set_pit_reinject(True)),
    ("PRE_FAULT_MEMORY", "KVM_PRE_FAULT_MEMORY",
     lambda vm, vcpu: vcpu.pre_fault_memory(0x1000, 0x1000)),
])
def test_each_call_names_the_capability_it_lacks(vm, monkeypatch, cap, ioctl, call):
    vm.create_irqchip()
    vcpu = vm.create_vcpu(0)
    without_capability(monkeypatch, vm, getattr(abi.Capability, cap))
    with pytest.raises(KvmUnsupported) as e:
        call(vm, vcpu)
    assert e.value.capability == f"KVM_CAP_{cap}" and e.value.ioctl == ioctl
