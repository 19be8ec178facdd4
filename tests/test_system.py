"""The /dev/kvm fd: capabilities, CPUID, MSRs, stats, devices, and per-vCPU state."""

from __future__ import annotations

import pytest

from kvm_bindings import Capability, abi


def test_api_version_is_checked_on_open(kvm):
    assert kvm.api_version == abi.KVM_API_VERSION == 12


def test_capability_report_names_every_capability(kvm):
    caps = kvm.capabilities()
    assert set(caps) == set(Capability)
    assert caps[Capability.USER_MEMORY] > 0         # every KVM since 2.6.29 has it
    assert kvm.check_extension(Capability.NR_VCPUS) == caps[Capability.NR_VCPUS]


def test_supported_cpuid_grows_its_buffer_until_it_fits(kvm):
    cpuid = kvm.supported_cpuid()
    entries = cpuid.flex_array()
    assert cpuid.nent == len(entries) > 0
    assert any(e.function == 0 for e in entries)
    assert len(kvm.emulated_cpuid().flex_array()) > 0


def test_msr_lists(kvm):
    indices = kvm.msr_index_list()
    assert 0x174 in indices                        # IA32_SYSENTER_CS is saved and restored
    if kvm.check_extension(Capability.GET_MSR_FEATURES):
        features = kvm.feature_msrs()
        assert set(features) <= set(kvm.feature_msr_index_list())


def test_vcpu_state_round_trips(vm):
    vcpu = vm.create_vcpu(0)
    for get, set_ in ((vcpu.get_regs, vcpu.set_regs), (vcpu.get_sregs, vcpu.set_sregs),
                      (vcpu.get_fpu, vcpu.set_fpu), (vcpu.get_xsave, vcpu.set_xsave),
                      (vcpu.get_xcrs, vcpu.set_xcrs), (vcpu.get_vcpu_events, vcpu.set_vcpu_events),
                      (vcpu.get_debugregs, vcpu.set_debugregs), (vcpu.get_sregs2, vcpu.set_sregs2)):
        state = get()
        set_(state)
        assert bytes(get()) == bytes(state), get.__name__
    regs = vcpu.get_regs()
    regs.rbx = 0x1234
    vcpu.set_regs(regs)
    assert vcpu.get_regs().rbx == 0x1234


def test_msrs_by_index(vm):
    vcpu = vm.create_vcpu(0)
    tsc_aux = 0xC0000103
    vcpu.set_msrs({tsc_aux: 7})
    assert vcpu.get_msrs([tsc_aux]) == {tsc_aux: 7}


def test_cpuid_set_and_read_back(vm):
    from kvm_bindings import x86
    vcpu = vm.create_vcpu(0)
    x86.set_supported_cpuid(vcpu)
    got = vcpu.get_cpuid2()
    assert got.nent == vm.kvm.supported_cpuid().nent


def test_mp_state_lapic_and_tsc(vm):
    vm.create_irqchip()
    vcpu = vm.create_vcpu(0)
    assert vcpu.get_mp_state() == abi.MpState.RUNNABLE
    lapic = vcpu.get_lapic()
    vcpu.set_lapic(lapic)
    assert vcpu.get_tsc_khz() > 0


def test_xsave2_is_sized_by_its_capability(vm):
    vcpu = vm.create_vcpu(0)
    size = vm.check_extension(Capability.XSAVE2)
    if not size:
        pytest.skip("no KVM_CAP_XSAVE2")
    assert vcpu.get_xsave2().flex_nbytes >= size


def test_one_reg_list_and_access(vm):
    vcpu = vm.create_vcpu(0)
    if not vm.check_extension(Capability.ONE_REG):
        pytest.skip("no KVM_CAP_ONE_REG")
    try:
        regs = vcpu.get_reg_list()
    except Exception as e:                        # x86 gained KVM_GET_REG_LIST late
        pytest.skip(f"KVM_GET_REG_LIST: {e}")
    for reg in regs[:4]:
        vcpu.set_one_reg(reg, vcpu.get_one_reg(reg))


def test_sync_regs_appear_in_kvm_run(vm, real_mode):
    vcpu = real_mode("port_io")
    vcpu.sync_regs(abi.KVM_SYNC_X86_REGS)
    vcpu.run()
    assert vcpu.kvm_run.s.regs.regs.rip == vcpu.get_regs().rip


def test_binary_stats_decode_names_and_values(vm, real_mode):
    vcpu = real_mode("port_io")
    for _ in range(3):
        vcpu.run()
    with vcpu.stats() as stats:
        values = stats.read()
        assert stats.id.endswith("vcpu-0")
        assert values["exits"] >= 3
        assert {d.type for d in stats.descriptors} <= {"cumulative", "instant", "peak",
                                                       "linear_hist", "log_hist"}
    with vm.stats() as vm_stats:
        assert "remote_tlb_flush" in vm_stats.read() or vm_stats.descriptors


def test_device_attributes(vm):
    from kvm_bindings import KvmError
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
    from kvm_bindings import KvmError
    vcpu = vm.create_vcpu(0)
    if not vm.check_extension(Capability.VCPU_ATTRIBUTES):
        pytest.skip("no KVM_CAP_VCPU_ATTRIBUTES")
    assert vcpu.has_attr(abi.KVM_VCPU_TSC_CTRL, abi.KVM_VCPU_TSC_OFFSET)
    assert not vcpu.has_attr(0x7FFF, 0)
    assert len(vcpu.get_attr(abi.KVM_VCPU_TSC_CTRL, abi.KVM_VCPU_TSC_OFFSET)) == 8
    # (this nested host accepts a TSC offset write but keeps the offset at 0, so the
    # value is not compared)
    vcpu.set_attr(abi.KVM_VCPU_TSC_CTRL, abi.KVM_VCPU_TSC_OFFSET, 0)
    with pytest.raises(KvmError) as err:
        vcpu.get_attr(0x7FFF, 0)
    assert err.value.ioctl == "KVM_GET_DEVICE_ATTR"


def test_enable_cap_on_a_vm(vm):
    vm.enable_cap(Capability.X86_DISABLE_EXITS, 0)


def test_guest_debug_flags(vm):
    vcpu = vm.create_vcpu(0)
    vcpu.set_guest_debug(abi.GuestDebugFlag.ENABLE | abi.GuestDebugFlag.SINGLESTEP)
    vcpu.set_guest_debug(0)


def test_clock_and_gsi_routing(vm):
    vm.create_irqchip()
    clock = vm.get_clock()
    vm.set_clock(clock)
    entry = abi.kvm_irq_routing_entry(gsi=5, type=abi.KVM_IRQ_ROUTING_IRQCHIP)
    entry.u.irqchip.irqchip, entry.u.irqchip.pin = 0, 5
    vm.set_gsi_routing([entry])
    vm.create_vcpu(0)                              # an MSI needs a destination
    assert vm.signal_msi(0xFEE00000, 0x30) >= 0


def test_signal_mask(vm):
    import signal
    vcpu = vm.create_vcpu(0)
    vcpu.set_signal_mask([signal.SIGUSR2])
    vcpu.set_signal_mask(None)


def test_cpuid_buffer_grows_on_e2big(kvm):
    """Starting with room for 2 entries, KVM answers E2BIG until the buffer is big enough."""
    small = kvm._cpuid(abi.KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID",
                       Capability.EXT_CPUID, start=2)
    assert small.nent > 2 and small.nent == kvm.supported_cpuid().nent


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


def test_identity_map_addr(kvm):
    with kvm.create_vm() as vm:
        vm.set_identity_map_addr(0xFFFBC000)


def test_manual_dirty_log_clear(vm, real_mode):
    vm.enable_cap(Capability.MANUAL_DIRTY_LOG_PROTECT2, abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    region = vm.memory.regions[0]
    vm.set_dirty_logging(region, True)
    vcpu = real_mode("dirty")
    vcpu.run()
    assert 0x5000 in vm.dirty_log(region)
    vm.clear_dirty_log(region)


def test_nmi_smi_and_nested_state(vm):
    vm.create_irqchip()
    vcpu = vm.create_vcpu(0)
    vcpu.nmi()
    if vm.check_extension(Capability.X86_SMM):
        vcpu.smi()
    assert vcpu.get_vcpu_events().nmi.pending == 1
    if vm.check_extension(Capability.NESTED_STATE):
        state = vcpu.get_nested_state()
        assert state.size >= 128
        vcpu.set_nested_state(state)


def test_interrupt_queues_an_external_interrupt_without_irqchip(vm):
    vcpu = vm.create_vcpu(0)
    vcpu.interrupt(0x20)
    events = vcpu.get_vcpu_events()
    assert events.interrupt.injected == 1 and events.interrupt.nr == 0x20
