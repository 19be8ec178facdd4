"""The /dev/kvm fd: capabilities, CPUID, MSRs, stats, devices, and per-vCPU state."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import signal
import struct
import threading
import time

import pytest

from kvm_bindings import (
    Capability,
    ExitReason,
    HltExit,
    InterruptedExit,
    KvmError,
    abi,
    x86,
)

GIVE_UP = 20.0   # seconds before a stuck vCPU thread fails the test instead of hanging it


def _host_cpu_vendor() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    pytest.skip("/proc/cpuinfo names no CPU vendor")


def test_api_version_is_checked_on_open(kvm):
    assert kvm.api_version == abi.KVM_API_VERSION == 12


def test_capability_report_names_every_capability(kvm):
    caps = kvm.capabilities()
    assert set(caps) == set(Capability)
    assert caps[Capability.USER_MEMORY] > 0         # every KVM since 2.6.29 has it
    assert caps[Capability.S390_UCONTROL] == 0      # s390 only: never on this arch
    assert 0 < caps[Capability.NR_VCPUS] <= caps[Capability.MAX_VCPUS]   # recommended <= most
    assert kvm.check_extension(Capability.NR_VCPUS) == caps[Capability.NR_VCPUS]


def test_supported_cpuid_grows_its_buffer_until_it_fits(kvm):
    cpuid = kvm.get_supported_cpuid()
    entries = cpuid.flex_array()
    assert cpuid.nent == len(entries) > 0
    leaf0 = next(e for e in entries if e.function == 0)
    vendor = b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))
    assert vendor.decode() == _host_cpu_vendor()    # KVM passes the host's vendor string through
    assert len(kvm.get_emulated_cpuid().flex_array()) > 0


def test_msr_lists(kvm):
    indices = kvm.get_msr_index_list()
    assert 0x174 in indices                        # IA32_SYSENTER_CS is saved and restored
    if kvm.check_extension(Capability.GET_MSR_FEATURES):
        # KVM lists only the feature MSRs it can read, so every one of them has a value.
        assert set(kvm.get_feature_msrs()) == set(kvm.get_msr_feature_index_list())


# XSAVE area layout (Intel SDM vol. 1, 13.4): XMM0 in the legacy region, XSTATE_BV in the header.
XSAVE_XMM0, XSAVE_XSTATE_BV, XFEATURE_SSE = 160, 512, 1 << 1


def _change_xsave(xsave):
    xsave.region[XSAVE_XMM0 // 4] = 0xDEADBEEF
    xsave.region[XSAVE_XSTATE_BV // 4] |= XFEATURE_SSE   # else KVM loads XMM as its init state


def _change_debugregs(debugregs):
    debugregs.db[0] = 0x1234_5000


# For each get/set pair: one field set to a value KVM accepts and a new vCPU does not have.
STATE_CHANGES = {
    "regs": lambda s: setattr(s, "rbx", 0x1234_5678),
    "sregs": lambda s: setattr(s, "cr2", 0xDEAD_0000),        # CR2 is kept as given
    "fpu": lambda s: setattr(s, "fcw", 0x27F),                # x87 precision 53 bits (reset: 64)
    "xsave": _change_xsave,
    "xcrs": lambda s: setattr(s.xcrs[0], "value", 0b11),      # XCR0: x87 and SSE state
    "vcpu_events": lambda s: setattr(s.nmi, "masked", 1),
    "debugregs": _change_debugregs,
    "sregs2": lambda s: setattr(s.gs, "base", 0x7000),
}


@pytest.mark.parametrize("state", STATE_CHANGES)
def test_set_state_is_what_get_state_returns(vm, state):
    vcpu = vm.create_vcpu(0)
    x86.set_supported_cpuid(vcpu)          # XCR0 may enable only what the guest's CPUID has
    get, set_ = getattr(vcpu, f"get_{state}"), getattr(vcpu, f"set_{state}")
    fresh, wanted = get(), get()
    STATE_CHANGES[state](wanted)
    assert bytes(wanted) != bytes(fresh)
    set_(wanted)
    assert bytes(get()) == bytes(wanted)   # the change is there, and nothing else moved


def test_sregs2_and_fpu_see_what_sregs_and_xsave_set(vm):
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    sregs.cr2 = 0xDEAD_0000
    vcpu.set_sregs(sregs)
    assert vcpu.get_sregs2().cr2 == 0xDEAD_0000
    # (not the other way round: KVM_SET_FPU leaves XSTATE_BV alone, so KVM_GET_XSAVE goes
    # on reporting x87 and SSE state in their init state)
    xsave = vcpu.get_xsave()
    _change_xsave(xsave)
    vcpu.set_xsave(xsave)
    assert bytes(vcpu.get_fpu().xmm[0][:4]) == (0xDEADBEEF).to_bytes(4, "little")


def test_msrs_by_index(vm):
    vcpu = vm.create_vcpu(0)
    tsc_aux = 0xC0000103
    assert vcpu.get_msrs([tsc_aux]) == {tsc_aux: 0}
    vcpu.set_msrs({tsc_aux: 7})
    assert vcpu.get_msrs([tsc_aux]) == {tsc_aux: 7}


def test_cpuid_set_and_read_back(vm):
    vcpu = vm.create_vcpu(0)
    assert vcpu.get_cpuid2().nent == 0             # a new vCPU has no CPUID at all
    supported = vm.kvm.get_supported_cpuid()
    vcpu.set_cpuid2(supported)
    got = vcpu.get_cpuid2()

    def leaves(cpuid):
        return [(e.function, e.index) for e in cpuid.flex_array()[:cpuid.nent]]
    assert leaves(got) == leaves(supported)
    # Leaf 0 comes back verbatim (KVM rewrites runtime bits in leaves 1, 7 and 0xD: not compared).
    assert bytes(got.flex_array()[0]) == bytes(supported.flex_array()[0])


def test_mp_state_set_is_read_back(vm):
    vm.create_irqchip()                            # any state but RUNNABLE needs the in-kernel LAPIC
    vcpu = vm.create_vcpu(0)
    assert vcpu.get_mp_state() == abi.MpState.RUNNABLE
    vcpu.set_mp_state(abi.MpState.HALTED)
    assert vcpu.get_mp_state() == abi.MpState.HALTED


# Local APIC registers (Intel SDM vol. 3, 11.4.1): offsets in kvm_lapic_state.regs.
APIC_TPR, APIC_PPR, APIC_SPIV, APIC_IRR = 0x80, 0xA0, 0xF0, 0x200
APIC_SPIV_ENABLE = 1 << 8


def _apic_reg(lapic, offset: int) -> int:
    return struct.unpack_from("<I", lapic, offset)[0]


def _set_apic_reg(lapic, offset: int, value: int) -> None:
    struct.pack_into("<I", lapic, offset, value)


def test_lapic_tpr_written_is_read_back_and_seen_as_cr8(vm):
    vm.create_irqchip()
    vcpu = vm.create_vcpu(0)
    lapic = vcpu.get_lapic()
    assert _apic_reg(lapic, APIC_TPR) == 0
    _set_apic_reg(lapic, APIC_TPR, 0x50)
    vcpu.set_lapic(lapic)
    got = vcpu.get_lapic()
    assert _apic_reg(got, APIC_TPR) == 0x50
    assert _apic_reg(got, APIC_PPR) == 0x50        # nothing in service: KVM derives PPR from TPR
    assert vcpu.get_sregs().cr8 == 0x5             # CR8 is TPR[7:4]


def test_tsc_khz_is_a_plausible_frequency(vm):
    assert 100_000 < vm.create_vcpu(0).get_tsc_khz() < 100_000_000   # 100 MHz .. 100 GHz


def test_xsave2_is_sized_by_its_capability_and_holds_the_xsave_state(vm):
    vcpu = vm.create_vcpu(0)
    size = vm.check_extension(Capability.XSAVE2)
    if not size:
        pytest.skip("no KVM_CAP_XSAVE2")
    assert size >= ctypes.sizeof(abi.kvm_xsave)   # the legacy 4 KiB area at least
    xsave = vcpu.get_xsave()
    _change_xsave(xsave)
    vcpu.set_xsave(xsave)
    xsave2 = vcpu.get_xsave2()
    assert xsave2.flex_nbytes >= size
    assert bytes(xsave2)[:ctypes.sizeof(xsave)] == bytes(xsave)


def _one_reg_msr(index: int) -> int:
    """KVM_X86_REG_MSR(index) of asm/kvm.h: the ONE_REG id of an MSR."""
    return abi.KVM_REG_X86 | abi.KVM_REG_SIZE_U64 | abi.KVM_X86_REG_TYPE_MSR << 32 | index


def test_one_reg_and_msr_ioctls_reach_the_same_msr(vm):
    if not vm.check_extension(Capability.ONE_REG):
        pytest.skip("no KVM_CAP_ONE_REG (x86 has it from Linux 6.18)")
    vcpu = vm.create_vcpu(0)
    sysenter_cs = 0x174
    vcpu.set_one_reg(_one_reg_msr(sysenter_cs), 0x10)
    assert vcpu.get_msrs([sysenter_cs]) == {sysenter_cs: 0x10}
    vcpu.set_msrs({sysenter_cs: 0x20})
    assert vcpu.get_one_reg(_one_reg_msr(sysenter_cs)) == 0x20


def test_every_register_in_the_reg_list_can_be_read(vm):
    if not vm.check_extension(Capability.ONE_REG):
        pytest.skip("no KVM_CAP_ONE_REG")
    vcpu = vm.create_vcpu(0)
    x86.set_supported_cpuid(vcpu)
    regs = vcpu.get_reg_list()
    if not regs:
        pytest.skip("KVM_GET_REG_LIST lists nothing here (x86 lists CET's guest SSP, where the "
                    "guest has shadow stacks)")
    assert len(set(regs)) == len(regs)
    for reg in regs:
        vcpu.get_one_reg(reg)


def test_sync_regs_appear_in_kvm_run(vm, real_mode):
    vcpu = real_mode("port_io")
    vcpu.enable_sync_regs(abi.KVM_SYNC_X86_REGS)
    vcpu.run()
    assert vcpu.kvm_run.s.regs.regs.rip == vcpu.get_regs().rip


def test_vcpu_stats_count_the_guests_hlt(real_mode):
    vcpu = real_mode("hlt")
    with vcpu.open_stats() as stats:
        assert stats.id == f"kvm-{os.getpid()}/vcpu-0"     # the kernel's "kvm-<pid>/vcpu-<id>"
        before = stats.read()
        assert isinstance(vcpu.run(), HltExit)
        after = stats.read()
    assert after["halt_exits"] - before["halt_exits"] == 1
    assert after["exits"] > before["exits"]


def test_stats_descriptors_decode_names_kinds_and_sizes(vm):
    vcpu = vm.create_vcpu(0)
    with vcpu.open_stats() as stats:
        descriptors = {d.name: d for d in stats.descriptors}
        values = stats.read()
    assert len(descriptors) == len(stats.descriptors) == len(values)
    garbled = [n for n in descriptors if not re.fullmatch(r"[a-z][a-z0-9_]*", n)]
    assert not garbled
    # Statistics every vCPU has (KVM_GENERIC_VCPU_STATS in the kernel), of known kinds:
    wait = descriptors["halt_wait_ns"]
    assert (wait.type, wait.unit, wait.base, wait.exponent, wait.size) == \
        ("cumulative", "seconds", 10, -9, 1)
    blocking = descriptors["blocking"]
    assert (blocking.type, blocking.unit, blocking.size) == ("instant", "boolean", 1)
    hist = descriptors["halt_wait_hist"]
    assert hist.type == "log_hist" and hist.size > 1
    assert len(values["halt_wait_hist"]) == hist.size
    assert isinstance(values["halt_wait_ns"], int)


def test_vm_stats_are_the_vms_own(vm):
    vm.create_vcpu(0)
    with vm.open_stats() as stats:
        assert stats.id == f"kvm-{os.getpid()}"             # the kernel's "kvm-<pid>"
        values = stats.read()
    assert isinstance(values["remote_tlb_flush"], int)      # a statistic of every VM
    assert "exits" not in values and "halt_exits" not in values   # those are per vCPU


def test_device_attributes(vm):
    try:
        dev = vm.create_device(abi.DeviceType.VFIO)
    except KvmError as e:
        pytest.skip(f"no VFIO device here: {e}")
    with dev:
        assert dev.has_attr(abi.KVM_DEV_VFIO_FILE, abi.KVM_DEV_VFIO_FILE_ADD)
        assert not dev.has_attr(0x7FFF, 0)
        with pytest.raises(KvmError) as err:       # -1 is no VFIO file: the kernel says so
            dev.set_attr(abi.KVM_DEV_VFIO_FILE, abi.KVM_DEV_VFIO_FILE_ADD, -1 & 0xFFFFFFFF, size=4)
        assert err.value.ioctl == "KVM_SET_DEVICE_ATTR"


def test_vcpu_attributes_are_reached_through_the_vcpu_fd(vm):
    vcpu = vm.create_vcpu(0)
    if not vm.check_extension(Capability.VCPU_ATTRIBUTES):
        pytest.skip("no KVM_CAP_VCPU_ATTRIBUTES")
    assert vcpu.has_attr(abi.KVM_VCPU_TSC_CTRL, abi.KVM_VCPU_TSC_OFFSET)
    assert not vcpu.has_attr(0x7FFF, 0)
    assert len(vcpu.get_attr(abi.KVM_VCPU_TSC_CTRL, abi.KVM_VCPU_TSC_OFFSET)) == 8
    # (this nested host accepts a TSC offset write but keeps the offset at 0, so the
    # value is not compared; a C program sees the same)
    vcpu.set_attr(abi.KVM_VCPU_TSC_CTRL, abi.KVM_VCPU_TSC_OFFSET, 0)
    with pytest.raises(KvmError) as err:
        vcpu.get_attr(0x7FFF, 0)
    assert err.value.ioctl == "KVM_GET_DEVICE_ATTR"
    with pytest.raises(KvmError) as err:
        vcpu.set_attr(0x7FFF, 0, 0)
    assert err.value.ioctl == "KVM_SET_DEVICE_ATTR"


def test_enabling_max_vcpu_id_refuses_higher_vcpu_ids(vm):
    vm.enable_cap(Capability.MAX_VCPU_ID, 4)       # from now on, vCPU ids 0..3 only
    vm.create_vcpu(3)
    with pytest.raises(KvmError) as err:
        vm.create_vcpu(4)
    assert (err.value.ioctl, err.value.errno) == ("KVM_CREATE_VCPU", errno.EINVAL)


def test_enabling_a_capability_that_cannot_be_enabled_is_refused(vm):
    with pytest.raises(KvmError) as err:
        vm.enable_cap(Capability.USER_MEMORY)      # always on: nothing to enable
    assert (err.value.ioctl, err.value.errno) == ("KVM_ENABLE_CAP", errno.EINVAL)


def test_hardware_breakpoint_stops_the_guest_until_guest_debug_is_cleared(real_mode):
    vcpu = real_mode("single_step")     # nop, inc %ax, inc %bx, nop, hlt at 0x1000..0x1004
    dr7_l0 = 1                          # breakpoint 0 enabled, on execution (R/W0 = LEN0 = 0)
    vcpu.set_guest_debug(abi.GuestDebugFlag.ENABLE | abi.GuestDebugFlag.USE_HW_BP,
                         [0x1003, 0, 0, 0, 0, 0, 0, dr7_l0])
    e = vcpu.run()
    assert e.reason is ExitReason.DEBUG
    assert (e.arch.exception, e.arch.pc) == (1, 0x1003)    # #DB before the second nop runs
    assert e.arch.dr6 & 1                                  # B0: breakpoint 0 matched
    regs = vcpu.get_regs()
    assert (regs.rax, regs.rbx) == (1, 1)                  # the three before it did run
    vcpu.set_guest_debug(0)
    assert isinstance(vcpu.run(), HltExit)


def test_set_clock_moves_the_guest_clock(vm):
    clock = vm.get_clock()
    start = clock.clock
    clock.clock += 10**12                          # 1000 s ahead
    vm.set_clock(clock)
    moved = vm.get_clock().clock - start
    assert 10**12 <= moved < 10**12 + 10**9        # the jump, plus under a second of running


def test_gsi_routing_sends_a_gsi_to_the_pin_it_names(vm):
    vm.create_irqchip()
    entry = abi.kvm_irq_routing_entry(gsi=5, type=abi.KVM_IRQ_ROUTING_IRQCHIP)
    entry.u.irqchip.irqchip, entry.u.irqchip.pin = abi.KVM_IRQCHIP_IOAPIC, 9
    vm.set_gsi_routing([entry])                    # the whole table: GSI 5 -> IOAPIC pin 9 only
    vm.set_irq_line(5, 1)
    # Every IOAPIC pin is masked after reset, so the raised line stays in IRR.
    assert vm.get_irqchip(abi.KVM_IRQCHIP_IOAPIC).chip.ioapic.irr == 1 << 9
    assert vm.get_irqchip(abi.KVM_IRQCHIP_PIC_MASTER).chip.pic.irr == 0   # default route gone


def test_signal_msi_is_delivered_once_the_lapic_is_enabled(vm):
    vm.create_irqchip()
    vcpu = vm.create_vcpu(0)                       # APIC ID 0, the MSI's destination
    to_apic_0, vector = 0xFEE00000, 0x30
    # api.rst: "> 0 on delivery, 0 if the guest blocked the MSI": the APIC starts disabled.
    assert vm.signal_msi(to_apic_0, vector) == 0
    lapic = vcpu.get_lapic()
    _set_apic_reg(lapic, APIC_SPIV, APIC_SPIV_ENABLE | 0xFF)
    vcpu.set_lapic(lapic)
    assert vm.signal_msi(to_apic_0, vector) == 1   # delivered to one vCPU
    irr = _apic_reg(vcpu.get_lapic(), APIC_IRR + 0x10 * (vector // 32))
    assert irr == 1 << (vector % 32)


@pytest.fixture
def sigusr2_handled():
    """A SIGUSR2 handler, so a SIGUSR2 that reaches the process interrupts instead of killing."""
    old = signal.signal(signal.SIGUSR2, lambda signum, frame: None)
    yield
    signal.signal(signal.SIGUSR2, old)


def _run_in_thread(vcpu):
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(exit=vcpu.run()), daemon=True)
    thread.start()
    return thread, result


def _signal_until_run_returns(thread, signum: int, seconds: float) -> bool:
    """Send signum to the vCPU thread every few ms (one sent before KVM_RUN starts proves
    nothing); True if run() returned within `seconds`."""
    deadline = time.monotonic() + seconds
    while thread.is_alive() and time.monotonic() < deadline:
        signal.pthread_kill(thread.ident, signum)
        thread.join(0.005)
    return not thread.is_alive()


def test_a_signal_in_the_vcpu_signal_mask_does_not_interrupt_kvm_run(real_mode, sigusr2_handled):
    vcpu = real_mode("spin")
    vcpu.set_signal_mask([signal.SIGUSR2])
    thread, result = _run_in_thread(vcpu)
    interrupted = _signal_until_run_returns(thread, signal.SIGUSR2, 0.1)
    vcpu.kick()                                    # the kick signal is not in the mask
    thread.join(GIVE_UP)
    assert not interrupted, "SIGUSR2 interrupted KVM_RUN although the vCPU's mask blocks it"
    assert isinstance(result["exit"], InterruptedExit)


def test_without_a_signal_mask_the_signal_interrupts_kvm_run(real_mode, sigusr2_handled):
    vcpu = real_mode("spin")
    vcpu.set_signal_mask([signal.SIGUSR2])
    vcpu.set_signal_mask(None)                     # back to the thread's mask, which lets it in
    thread, result = _run_in_thread(vcpu)
    interrupted = _signal_until_run_returns(thread, signal.SIGUSR2, 2.0)
    vcpu.kick()
    thread.join(GIVE_UP)
    assert interrupted, "SIGUSR2 did not interrupt KVM_RUN after the mask was removed"
    assert isinstance(result["exit"], InterruptedExit)


def test_cpuid_buffer_grows_on_e2big(kvm):
    """Starting with room for 2 entries, KVM answers E2BIG until the buffer is big enough."""
    small = kvm._cpuid(abi.KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID",
                       Capability.EXT_CPUID, start=2)
    assert small.nent > 2 and small.nent == kvm.get_supported_cpuid().nent


def test_a_capability_this_host_lacks_raises_kvm_unsupported(kvm):
    from kvm_bindings import KvmUnsupported
    with kvm.create_vm() as vm:
        missing = [c for c in (Capability.MEMORY_ATTRIBUTES, Capability.S390_UCONTROL,
                               Capability.PPC_HTAB_FD) if not vm.check_extension(c)]
        assert missing, "this host has every capability probed here"
        if Capability.MEMORY_ATTRIBUTES in missing:
            with pytest.raises(KvmUnsupported, match="KVM_CAP_MEMORY_ATTRIBUTES"):
                vm.set_memory_attributes(0, 0x1000, abi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        with pytest.raises(KvmUnsupported, match=f"KVM_CAP_{missing[-1].name}"):
            vm.require(missing[-1], "a feature this host lacks")


def test_identity_map_addr_is_refused_once_a_vcpu_exists(vm):
    vm.set_identity_map_addr(0xFFFBC000)           # the page below the TSS, as QEMU once had it
    vm.create_vcpu(0)
    with pytest.raises(KvmError) as err:           # api.rst: "Fails if any VCPU has already been created"
        vm.set_identity_map_addr(0xFFFBC000)
    assert (err.value.ioctl, err.value.errno) == ("KVM_SET_IDENTITY_MAP_ADDR", errno.EINVAL)


DIRTY_PAGES = [0x3000, 0x5000, 0x9000]             # the pages dirty.S writes


def _ran_dirty_guest_with_manual_protect(vm, real_mode):
    """dirty.S run once, its slot logging dirty pages that only KVM_CLEAR_DIRTY_LOG re-protects."""
    vm.enable_cap(Capability.MANUAL_DIRTY_LOG_PROTECT2, abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    region = vm.memory.regions[0]
    vm.set_dirty_logging(region, True)
    vcpu = real_mode("dirty")
    assert isinstance(vcpu.run(), HltExit)
    return vcpu, region


def test_manual_protect_keeps_pages_dirty_until_cleared(vm, real_mode):
    _, region = _ran_dirty_guest_with_manual_protect(vm, real_mode)
    assert list(vm.get_dirty_log(region)) == DIRTY_PAGES
    assert list(vm.get_dirty_log(region)) == DIRTY_PAGES     # reading the log no longer resets it


def test_cleared_pages_stay_clean_until_written_again(vm, real_mode):
    vcpu, region = _ran_dirty_guest_with_manual_protect(vm, real_mode)
    vm.clear_dirty_log(region)
    assert list(vm.get_dirty_log(region)) == []
    x86.setup_real_mode(vcpu, 0x1000)              # run dirty.S again from its start
    assert isinstance(vcpu.run(), HltExit)
    assert list(vm.get_dirty_log(region)) == DIRTY_PAGES


def test_nmi_smi_and_nested_state(vm):
    vm.create_irqchip()
    vcpu = vm.create_vcpu(0)
    vcpu.inject_nmi()
    if vm.check_extension(Capability.X86_SMM):
        vcpu.inject_smi()
    assert vcpu.get_vcpu_events().nmi.pending == 1
    if vm.check_extension(Capability.NESTED_STATE):
        state = vcpu.get_nested_state()
        assert state.size >= 128
        vcpu.set_nested_state(state)


def test_interrupt_queues_an_external_interrupt_without_irqchip(vm):
    vcpu = vm.create_vcpu(0)
    vcpu.inject_interrupt(0x20)
    events = vcpu.get_vcpu_events()
    assert events.interrupt.injected == 1 and events.interrupt.nr == 0x20
