"""The arm64 classes and register ids, on a host that cannot run arm64 guests.

Register ids are checked against the uapi's own macros compiled by aarch64-linux-gnu-gcc
(skipped without it, failed under KVM_BINDINGS_REQUIRE_TOOLS=1). The classes run against
a fake kernel (tests/cross_oracle.py) that records each ioctl: its number, which fd, and
the bytes the kernel would read.
"""

from __future__ import annotations

import ctypes
import errno
import struct

import pytest

from kvm_bindings import KvmError, KvmUnsupported, StaleHandleError, arm64
from kvm_bindings.abi import arm64 as abi
from kvm_bindings.arm64 import Arm64Kvm, Arm64Vcpu, Arm64Vm

from .cross_oracle import Call, FakeKernel, c_values, default_caps, one_reg_registers, only_call

# ---- register ids against the C compiler ---------------------------------------------------


def test_every_core_register_id_is_what_the_uapi_macro_gives():
    """KVM_REG_ARM_CORE_REG(member) | KVM_REG_ARM_CORE | KVM_REG_ARM64, sized as the member is
    (the kernel refuses any other size): for every core register, by name and by member."""
    names = list(arm64.CORE_REG_PATHS.items())
    exprs = [f"KVM_REG_ARM64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG({path}) | "
             f"((__u64)__builtin_ctzll(sizeof(((struct kvm_regs *)0)->{path})) << KVM_REG_SIZE_SHIFT)"
             for _, path in names]
    expected = c_values("arm64", exprs)
    assert len(names) == 31 + 3 + 2 + 5 + 32 + 2
    for (name, path), want in zip(names, expected):
        assert arm64.core_reg(name) == want, name
        assert arm64.core_reg(path) == want, path


def test_core_register_sizes_are_the_members_sizes():
    assert [arm64.reg_size(arm64.core_reg(n)) for n in ("x0", "pc", "spsr_fiq", "v0", "v31", "fpsr")] \
        == [8, 8, 8, 16, 16, 4]
    assert arm64.core_reg("v0") & abi.KVM_REG_SIZE_MASK == abi.KVM_REG_SIZE_U128


SYSREG_ENCODINGS = [(op0, op1, crn, crm, op2) for op0 in range(4) for op1 in (0, 3, 4, 7)
                    for crn in (0, 1, 9, 14, 15) for crm in (0, 2, 3, 15) for op2 in (0, 1, 5, 7)]


def test_system_register_ids_are_what_ARM64_SYS_REG_gives():
    expected = c_values("arm64", [f"ARM64_SYS_REG({', '.join(map(str, e))})"
                                  for e in SYSREG_ENCODINGS])
    assert [arm64.sys_reg(*e) for e in SYSREG_ENCODINGS] == expected


def test_the_timer_registers_the_uapi_names_are_sys_regs():
    assert arm64.sys_reg(3, 3, 14, 3, 1) == abi.KVM_REG_ARM_TIMER_CTL
    assert arm64.sys_reg(3, 3, 14, 2, 2) == abi.KVM_REG_ARM_PTIMER_CVAL


@pytest.mark.parametrize("field, encoding", [
    ("op0", (4, 0, 0, 0, 0)), ("op1", (3, 8, 0, 0, 0)), ("crn", (3, 0, 16, 0, 0)),
    ("crm", (3, 0, 0, 16, 0)), ("op2", (3, 0, 0, 0, 8)), ("op2", (3, 0, 0, 0, -1)),
])
def test_a_system_register_field_out_of_range_is_refused_not_masked(field, encoding):
    with pytest.raises(ValueError, match=field):
        arm64.sys_reg(*encoding)


def test_sve_register_ids_are_what_the_uapi_macros_give():
    z = [(n, i) for n in (0, 1, 17, 31) for i in (0, 1, 31)]
    p = [(n, i) for n in (0, 7, 15) for i in (0, 2, 31)]
    f = [0, 1, 31]
    expected = c_values("arm64", [f"KVM_REG_ARM64_SVE_ZREG({n}, {i})" for n, i in z]
                        + [f"KVM_REG_ARM64_SVE_PREG({n}, {i})" for n, i in p]
                        + [f"KVM_REG_ARM64_SVE_FFR({i})" for i in f])
    got = ([arm64.sve_zreg(n, i) for n, i in z] + [arm64.sve_preg(n, i) for n, i in p]
           + [arm64.sve_ffr(i) for i in f])
    assert got == expected
    assert arm64.reg_size(arm64.sve_zreg(0)) == 256 and arm64.reg_size(arm64.sve_preg(0)) == 32
    with pytest.raises(ValueError, match="n=32"):
        arm64.sve_zreg(32)
    with pytest.raises(ValueError, match="n=16"):
        arm64.sve_preg(16)
    with pytest.raises(ValueError, match="slice=32"):
        arm64.sve_ffr(32)


def test_vm_type_ipa_size_is_what_the_uapi_macro_gives():
    bits = [1, 32, 40, 48, 52, 255]
    assert [arm64.vm_type_ipa_size(b) for b in bits] == \
        c_values("arm64", [f"KVM_VM_TYPE_ARM_IPA_SIZE({b})" for b in bits])
    # Where the macro silently masks (0, 256 -> 0; 0x1FF -> 255), here it is an error.
    for bad in (0, 256, 0x1FF, -1):
        with pytest.raises(ValueError, match="IPA-size field"):
            arm64.vm_type_ipa_size(bad)
    with pytest.raises(TypeError):
        arm64.vm_type_ipa_size(True)


@pytest.mark.parametrize("name", ["x31", "v32", "X0", "regs.regs[31]", "spsr[5]", "fp_regs",
                                  "_pad4", "fp_regs.__reserved[0]", "regs", ""])
def test_an_unknown_core_register_name_is_a_clear_error(name):
    with pytest.raises(ValueError, match="not an arm64 core register"):
        arm64.core_reg(name)


def test_irq_line_packs_type_vcpu_and_number_as_the_api_documents():
    # KVM API doc, KVM_IRQ_LINE on arm64: bits 31-28 vcpu2_index, 27-24 irq_type,
    # 23-16 vcpu_index, 15-0 irq_id.
    assert arm64.irq_line(abi.KVM_ARM_IRQ_TYPE_SPI, 40) == 0x0100_0028
    assert arm64.irq_line(abi.KVM_ARM_IRQ_TYPE_PPI, 27, vcpu=300) == 0x122C_001B
    assert arm64.irq_line(abi.KVM_ARM_IRQ_TYPE_CPU, abi.KVM_ARM_IRQ_CPU_FIQ, vcpu=3) == 0x0003_0001
    with pytest.raises(ValueError, match="vcpu"):
        arm64.irq_line(abi.KVM_ARM_IRQ_TYPE_PPI, 27, vcpu=4096)
    with pytest.raises(ValueError, match="number"):
        arm64.irq_line(abi.KVM_ARM_IRQ_TYPE_SPI, 0x10000)


# ---- the classes against a fake kernel ------------------------------------------------------

@pytest.fixture
def kernel(monkeypatch):
    caps = default_caps(abi)
    caps |= {abi.Capability.ARM_VM_IPA_SIZE: 48, abi.Capability.VCPU_EVENTS: 1}
    return FakeKernel(abi, caps).install(monkeypatch)


@pytest.fixture
def kvm(kernel):
    with Arm64Kvm("/dev/null") as k:
        yield k


@pytest.fixture
def vm(kvm):
    with kvm.create_vm() as v:
        yield v


@pytest.fixture
def vcpu(vm):
    return vm.create_vcpu(0)


def only(kernel: FakeKernel, name: str, role: str) -> Call:
    """The one call of ioctl `name` on a `role` fd, checked against this arch's IOCTLS."""
    return only_call(kernel, abi, name, role)


def test_the_classes_are_the_arm64_ones(kvm, vm, vcpu):
    assert type(vm) is Arm64Vm and type(vcpu) is Arm64Vcpu and vm.vcpus == (vcpu,)


def test_create_vm_puts_ipa_bits_in_the_vm_type(kernel, kvm):
    with kvm.create_vm(ipa_bits=40) as v:
        assert v.ipa_bits == 40
    call = only(kernel, "KVM_CREATE_VM", "system")
    assert call.arg == 40 and abi.IOCTLS["KVM_CREATE_VM"].direction == "none"


def test_create_vm_without_ipa_bits_passes_type_zero(kernel, kvm):
    with kvm.create_vm() as v:
        assert v.ipa_bits is None
    assert only(kernel, "KVM_CREATE_VM", "system").arg == 0


def test_create_vm_keeps_other_type_bits(kernel, kvm):
    with kvm.create_vm(abi.KVM_VM_TYPE_ARM_PROTECTED, ipa_bits=44):
        pass
    assert only(kernel, "KVM_CREATE_VM", "system").arg == abi.KVM_VM_TYPE_ARM_PROTECTED | 44


def test_ipa_bits_beyond_the_capability_are_refused_before_the_kernel_is_asked(kernel, kvm):
    with pytest.raises(ValueError, match="KVM_CAP_ARM_VM_IPA_SIZE is 48"):
        kvm.create_vm(ipa_bits=49)
    assert kernel.calls_to("KVM_CREATE_VM") == []


def test_ipa_bits_without_the_capability_are_unsupported(kernel, kvm):
    kernel.caps[abi.Capability.ARM_VM_IPA_SIZE] = 0
    with pytest.raises(KvmUnsupported, match="KVM_CAP_ARM_VM_IPA_SIZE"):
        kvm.create_vm(ipa_bits=40)
    assert kernel.calls_to("KVM_CREATE_VM") == []


@pytest.mark.parametrize("bits, error", [(0, ValueError), (256, ValueError), (-1, OverflowError),
                                         (40.0, TypeError), (True, TypeError)])
def test_ipa_bits_that_do_not_fit_the_field_are_refused(kernel, kvm, bits, error):
    with pytest.raises(error):
        kvm.create_vm(ipa_bits=bits)
    assert kernel.calls_to("KVM_CREATE_VM") == []


def test_ipa_bits_given_twice_are_refused(kvm):
    with pytest.raises(ValueError, match="once"):
        kvm.create_vm(40, ipa_bits=40)


def test_a_refused_ipa_size_says_what_the_kernel_accepts(kernel, kvm):
    def refuse(call: Call) -> int:
        raise OSError(errno.EINVAL, "")
    kernel.handlers["KVM_CREATE_VM"] = refuse
    with pytest.raises(KvmError, match="from 32 bits"):
        kvm.create_vm(ipa_bits=31)


def target_is(target: int):
    def answer(call: Call) -> int:
        assert call.arg is not None
        init = abi.kvm_vcpu_init.from_address(call.arg)
        init.target = target
        return 0
    return answer


def test_preferred_target_reads_a_kvm_vcpu_init_from_the_vm(kernel, vm):
    kernel.handlers["KVM_ARM_PREFERRED_TARGET"] = target_is(abi.KVM_ARM_TARGET_GENERIC_V8)
    init = vm.preferred_target()
    assert isinstance(init, abi.kvm_vcpu_init) and init.target == abi.KVM_ARM_TARGET_GENERIC_V8
    only(kernel, "KVM_ARM_PREFERRED_TARGET", "vm")
    assert abi.IOCTLS["KVM_ARM_PREFERRED_TARGET"].direction == "read"


def test_vcpu_init_sends_the_preferred_target_and_the_feature_bitmap(kernel, vcpu):
    kernel.handlers["KVM_ARM_PREFERRED_TARGET"] = target_is(7)
    vcpu.vcpu_init(features=[abi.KVM_ARM_VCPU_PSCI_0_2, abi.KVM_ARM_VCPU_PMU_V3, 33])
    call = only(kernel, "KVM_ARM_VCPU_INIT", "vcpu")
    assert abi.IOCTLS["KVM_ARM_VCPU_INIT"].direction == "write"
    # target, then features[7] as __u32 words: bits 2 and 3 in word 0, bit 33 is word 1 bit 1.
    assert call.data == struct.pack("<8I", 7, 0b1100, 0b10, 0, 0, 0, 0, 0)


def test_vcpu_init_with_a_target_does_not_ask_for_the_preferred_one(kernel, vcpu):
    vcpu.vcpu_init(abi.KVM_ARM_TARGET_CORTEX_A57, [abi.KVM_ARM_VCPU_POWER_OFF])
    assert kernel.calls_to("KVM_ARM_PREFERRED_TARGET") == []
    assert only(kernel, "KVM_ARM_VCPU_INIT", "vcpu").data == struct.pack(
        "<8I", abi.KVM_ARM_TARGET_CORTEX_A57, 1, 0, 0, 0, 0, 0, 0)


@pytest.mark.parametrize("features, error", [([224], ValueError), ([-1], ValueError),
                                             (["psci"], TypeError), ([True], TypeError)])
def test_a_feature_bit_out_of_range_is_refused_and_nothing_is_sent(kernel, vcpu, features, error):
    with pytest.raises(error):
        vcpu.vcpu_init(5, features)
    assert kernel.calls_to("KVM_ARM_VCPU_INIT") == []


def test_finalize_passes_a_pointer_to_the_feature_as_an_int(kernel, vcpu):
    vcpu.finalize(abi.KVM_ARM_VCPU_SVE)
    call = only(kernel, "KVM_ARM_VCPU_FINALIZE", "vcpu")
    assert call.data == struct.pack("<i", abi.KVM_ARM_VCPU_SVE)
    with pytest.raises(OverflowError):
        vcpu.finalize(1 << 31)


def one_reg_file(kernel: FakeKernel, regs: dict[int, int]) -> None:
    one_reg_registers(kernel, abi, regs)


V31 = int.from_bytes(bytes(range(1, 17)), "little")     # all 128 bits distinct


def test_a_v_register_is_read_through_a_16_byte_buffer_as_a_128_bit_int(kernel, vcpu):
    one_reg_file(kernel, {arm64.core_reg("v31"): V31})
    assert vcpu.get_core_reg("v31") == V31
    call = only(kernel, "KVM_GET_ONE_REG", "vcpu")
    assert call.struct(abi.kvm_one_reg).id == arm64.core_reg("fp_regs.vregs[31]")


def test_set_core_reg_writes_the_value_at_the_registers_width(kernel, vcpu):
    regs = {arm64.core_reg("pc"): 0, arm64.core_reg("v0"): 0, arm64.core_reg("fpcr"): 0}
    one_reg_file(kernel, regs)
    vcpu.set_core_reg("pc", 0x4000_1000)
    vcpu.set_core_reg("v0", V31)
    assert regs == {arm64.core_reg("pc"): 0x4000_1000, arm64.core_reg("v0"): V31,
                    arm64.core_reg("fpcr"): 0}
    with pytest.raises(OverflowError, match="32 bits"):
        vcpu.set_core_reg("fpcr", 1 << 32)
    with pytest.raises(ValueError, match="not an arm64 core register"):
        vcpu.set_core_reg("x31", 0)
    assert len(kernel.calls_to("KVM_SET_ONE_REG")) == 2


def reg_list(kernel: FakeKernel, ids: list[int]) -> None:
    def answer(call: Call) -> int:
        assert call.arg is not None
        lst = abi.kvm_reg_list.from_address(call.arg)
        if lst.n < len(ids):
            lst.n = len(ids)
            raise OSError(errno.E2BIG, "")
        lst.n = len(ids)
        (ctypes.c_uint64 * len(ids)).from_address(call.arg + abi.kvm_reg_list.reg.offset)[:] = ids
        return 0
    kernel.handlers["KVM_GET_REG_LIST"] = answer


def test_get_registers_reads_every_listed_register_at_its_size(kernel, vcpu):
    regs = {arm64.core_reg("x0"): 0x1122_3344_5566_7788, arm64.core_reg("fpsr"): 0x8000_0001,
            arm64.core_reg("v1"): V31, arm64.sys_reg(3, 0, 1, 0, 0): 0x30D0_0800,
            arm64.sve_zreg(3): (1 << 2047) | 5}
    one_reg_file(kernel, dict(regs))
    reg_list(kernel, list(regs))
    assert vcpu.get_registers() == regs
    assert len(kernel.calls_to("KVM_GET_REG_LIST", "vcpu")) == 2     # E2BIG, then the list
    assert len(kernel.calls_to("KVM_GET_ONE_REG", "vcpu")) == len(regs)


def test_set_registers_restores_what_get_registers_read(kernel, vcpu):
    saved = {arm64.core_reg("pc"): 0x8_0000, arm64.core_reg("v2"): V31}
    regs = dict.fromkeys(saved, 0)
    one_reg_file(kernel, regs)
    vcpu.set_registers(saved)
    assert regs == saved


def test_set_registers_names_the_register_the_kernel_refused(kernel, vcpu):
    one_reg_file(kernel, {})
    with pytest.raises(KvmError, match=hex(arm64.core_reg("pc"))):
        vcpu.set_registers({arm64.core_reg("pc"): 1})


def test_vcpu_events_use_arm64s_struct(kernel, vcpu):
    def pending(call: Call) -> int:
        assert call.arg is not None
        abi.kvm_vcpu_events.from_address(call.arg).exception.serror_pending = 1
        return 0
    kernel.handlers["KVM_GET_VCPU_EVENTS"] = pending
    events = vcpu.get_vcpu_events()
    assert events.exception.serror_pending == 1
    only(kernel, "KVM_GET_VCPU_EVENTS", "vcpu")
    events.exception.serror_esr = 0x1234
    vcpu.set_vcpu_events(events)
    sent = only(kernel, "KVM_SET_VCPU_EVENTS", "vcpu").struct(abi.kvm_vcpu_events)
    assert (sent.exception.serror_pending, sent.exception.serror_esr) == (1, 0x1234)
    from kvm_bindings.abi import x86_64
    with pytest.raises(TypeError, match="kvm_vcpu_events"):
        vcpu.set_vcpu_events(x86_64.kvm_vcpu_events())


def test_set_guest_debug_sends_arm64s_kvm_guest_debug_with_the_debug_registers(kernel, vcpu):
    control = abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_USE_HW
    vcpu.set_guest_debug(control, dbg_bcr=[0x1E7], dbg_bvr=[0x4000_0000],
                         dbg_wvr=[0, 0x5000_0000])
    dbg = only(kernel, "KVM_SET_GUEST_DEBUG", "vcpu").struct(abi.kvm_guest_debug)
    assert dbg.control == control
    assert (dbg.arch.dbg_bcr[0], dbg.arch.dbg_bvr[0], dbg.arch.dbg_wvr[1]) == (0x1E7, 0x4000_0000,
                                                                               0x5000_0000)
    assert list(dbg.arch.dbg_wcr) == [0] * abi.KVM_ARM_MAX_DBG_REGS


def test_set_single_step_uses_arm64s_kvm_guest_debug(kernel, vcpu):
    vcpu.set_single_step()
    dbg = only(kernel, "KVM_SET_GUEST_DEBUG", "vcpu").struct(abi.kvm_guest_debug)
    assert dbg.control == abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_SINGLESTEP


def test_too_many_debug_registers_are_refused(kernel, vcpu):
    with pytest.raises(ValueError, match="at most 16 dbg_bvr"):
        vcpu.set_guest_debug(abi.KVM_GUESTDBG_ENABLE, dbg_bvr=[0] * 17)
    with pytest.raises(OverflowError, match="dbg_wcr"):
        vcpu.set_guest_debug(abi.KVM_GUESTDBG_ENABLE, dbg_wcr=[1 << 64])
    assert kernel.calls_to("KVM_SET_GUEST_DEBUG") == []


def attrs_set(kernel: FakeKernel) -> list[tuple[int, int, int | None]]:
    """Each KVM_SET_DEVICE_ATTR as (group, attr, the u64 at addr or None)."""
    out = []
    for call in kernel.calls_to("KVM_SET_DEVICE_ATTR", "device"):
        a = call.struct(abi.kvm_device_attr)
        out.append((a.group, a.attr, ctypes.c_uint64.from_address(a.addr).value if a.addr else None))
    return out


def test_create_vgic_v3_creates_the_device_and_places_it(kernel, vm):
    recorded: list[int] = []

    def keep(call: Call) -> int:     # the value buffer lives only during the call
        a = call.struct(abi.kvm_device_attr)
        recorded.append(ctypes.c_uint64.from_address(a.addr).value)
        return 0
    kernel.handlers["KVM_SET_DEVICE_ATTR"] = keep
    gic = vm.create_vgic_v3(0x0800_0000, 0x080A_0000, nr_irqs=128)
    req = only(kernel, "KVM_CREATE_DEVICE", "vm").struct(abi.kvm_create_device)
    assert (req.type, req.flags) == (abi.KVM_DEV_TYPE_ARM_VGIC_V3, 0)
    assert gic.device_type == abi.KVM_DEV_TYPE_ARM_VGIC_V3
    attrs = [call.struct(abi.kvm_device_attr) for call in kernel.calls_to("KVM_SET_DEVICE_ATTR",
                                                                            "device")]
    assert [(a.group, a.attr) for a in attrs] == [
        (abi.KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0),
        (abi.KVM_DEV_ARM_VGIC_GRP_ADDR, abi.KVM_VGIC_V3_ADDR_TYPE_DIST),
        (abi.KVM_DEV_ARM_VGIC_GRP_ADDR, abi.KVM_VGIC_V3_ADDR_TYPE_REDIST)]
    assert [recorded[0] & 0xFFFF_FFFF, recorded[1], recorded[2]] == [128, 0x0800_0000, 0x080A_0000]


def test_init_vgic_sends_ctrl_init_to_a_vgic_of_this_vm(kernel, kvm, vm):
    gic = vm.create_vgic_v3(0x0800_0000, 0x080A_0000)
    vm.init_vgic(gic)
    assert attrs_set(kernel)[-1] == (abi.KVM_DEV_ARM_VGIC_GRP_CTRL, abi.KVM_DEV_ARM_VGIC_CTRL_INIT,
                                     None)
    with kvm.create_vm() as other:
        with pytest.raises(StaleHandleError, match="this VM"):
            other.init_vgic(gic)


def test_create_vgic_v3_refuses_an_address_that_does_not_fit_before_creating_anything(kernel, vm):
    with pytest.raises(OverflowError, match="redist_addr"):
        vm.create_vgic_v3(0x0800_0000, 1 << 64)
    assert kernel.calls_to("KVM_CREATE_DEVICE") == []


def test_the_core_calls_use_the_same_numbers_as_arm64s_table(kernel, vcpu):
    """get/set_one_reg, get_reg_list and mp_state come from the core, which uses the host's
    ABI module: on any host their numbers must be arm64's."""
    one_reg_file(kernel, {arm64.core_reg("pc"): 0})
    reg_list(kernel, [arm64.core_reg("pc")])
    vcpu.get_registers()
    vcpu.get_mp_state()
    for name in ("KVM_GET_ONE_REG", "KVM_GET_MP_STATE"):
        only(kernel, name, "vcpu")
    assert {c.number for c in kernel.calls_to("KVM_GET_REG_LIST")} == \
        {abi.IOCTLS["KVM_GET_REG_LIST"].number}


def test_snapshots_are_refused_naming_what_is_not_saved(kvm, vm):
    with pytest.raises(NotImplementedError, match="x86_64 VMs; Arm64Vm's state"):
        vm.save_state()
    with pytest.raises(NotImplementedError, match="Arm64Vm"):
        vm.load_state(None)
    with pytest.raises(NotImplementedError, match="Arm64Vm"):
        kvm.restore_vm(None)
