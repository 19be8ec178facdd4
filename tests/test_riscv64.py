"""The riscv64 classes and register ids, on a host that cannot run riscv64 guests.

Register ids are checked against the uapi's own macros compiled by riscv64-linux-gnu-gcc
(skipped without it, failed under KVM_BINDINGS_REQUIRE_TOOLS=1). The classes run against
a fake kernel (tests/cross_oracle.py) that records each ioctl: its number, which fd, and
the bytes the kernel would read.
"""

from __future__ import annotations

import ctypes
import errno
import struct

import pytest

from kvm_bindings import KvmError, riscv64
from kvm_bindings.abi import riscv64 as abi
from kvm_bindings.riscv64 import Riscv64Kvm, Riscv64Vcpu, Riscv64Vm

from .cross_oracle import Call, FakeKernel, c_values, default_caps, one_reg_registers, only_call

# ---- register ids against the C compiler ---------------------------------------------------

# What each id is made of in C: the type (and subtype) bits, the macro giving the index, and
# the member's own size, as the kernel checks it (KVM_REG_SIZE(id) must be sizeof the member).
KINDS = {
    "core": ("KVM_REG_RISCV_CORE", "KVM_REG_RISCV_CORE_REG", "struct kvm_riscv_core"),
    "csr": ("KVM_REG_RISCV_CSR | KVM_REG_RISCV_CSR_GENERAL", "KVM_REG_RISCV_CSR_REG",
            "struct kvm_riscv_csr"),
    "aia": ("KVM_REG_RISCV_CSR | KVM_REG_RISCV_CSR_AIA", "KVM_REG_RISCV_CSR_AIA_REG",
            "struct kvm_riscv_aia_csr"),
    "smstateen": ("KVM_REG_RISCV_CSR | KVM_REG_RISCV_CSR_SMSTATEEN",
                  "KVM_REG_RISCV_CSR_SMSTATEEN_REG", "struct kvm_riscv_smstateen_csr"),
    "config": ("KVM_REG_RISCV_CONFIG", "KVM_REG_RISCV_CONFIG_REG", "struct kvm_riscv_config"),
    "timer": ("KVM_REG_RISCV_TIMER", "KVM_REG_RISCV_TIMER_REG", "struct kvm_riscv_timer"),
}


def c_id(kind: str, member: str) -> str:
    bits, macro, struct_name = KINDS[kind]
    return (f"KVM_REG_RISCV | {bits} | {macro}({member}) | ((__u64)__builtin_ctzll("
            f"sizeof((({struct_name} *)0)->{member})) << KVM_REG_SIZE_SHIFT)")


def test_every_named_register_id_is_what_the_uapi_macros_give():
    from kvm_bindings.riscv64 import regs
    cases = [("core", name, riscv64.core_reg) for name in riscv64.CORE_REGS if "." in name
             or name == "mode"]
    cases += [(kind, name, riscv64.csr_reg) for kind, cls in (
        ("csr", abi.kvm_riscv_csr), ("aia", abi.kvm_riscv_aia_csr),
        ("smstateen", abi.kvm_riscv_smstateen_csr)) for name, *_ in cls._fields_]
    cases += [("config", name, riscv64.config_reg) for name in riscv64.CONFIG_REGS]
    cases += [("timer", name, riscv64.timer_reg) for name in riscv64.TIMER_REGS]
    expected = c_values("riscv64", [c_id(kind, name) for kind, name, _ in cases])
    assert len(cases) == 33 + 11 + 7 + 1 + 8 + 4
    for (kind, name, fn), want in zip(cases, expected):
        assert fn(name) == want, (kind, name)
        if kind == "core" and "." in name:
            assert fn(name.split(".")[1]) == want      # "pc" as well as "regs.pc"
    assert regs.ULONG == c_values("riscv64", ["sizeof(unsigned long)"])[0]


def test_riscv64_registers_are_64_bits():
    ids = [*riscv64.CORE_REGS.values(), *riscv64.CSRS.values(), *riscv64.CONFIG_REGS.values(),
           *riscv64.TIMER_REGS.values(), riscv64.isa_ext_reg(0), riscv64.sbi_ext_reg(0)]
    assert {i & abi.KVM_REG_SIZE_MASK for i in ids} == {abi.KVM_REG_SIZE_U64}


def test_extension_register_ids_are_what_the_uapi_gives():
    isa = [int(e) for e in abi.RiscvIsaExtId]
    sbi = [int(e) for e in abi.RiscvSbiExtId]
    single = "KVM_REG_RISCV | KVM_REG_SIZE_U64 | KVM_REG_RISCV_{0} | KVM_REG_RISCV_{1}_SINGLE | {2}"
    expected = c_values("riscv64", [single.format("ISA_EXT", "ISA", e) for e in isa]
                        + [single.format("SBI_EXT", "SBI", e) for e in sbi])
    assert [riscv64.isa_ext_reg(e) for e in isa] + [riscv64.sbi_ext_reg(e) for e in sbi] == expected
    assert riscv64.isa_ext_reg("zba") == riscv64.isa_ext_reg(abi.RiscvIsaExtId.ZBA)
    assert riscv64.sbi_ext_reg("HSM") == riscv64.sbi_ext_reg(abi.KVM_RISCV_SBI_EXT_HSM)


@pytest.mark.parametrize("fn, name", [
    (riscv64.core_reg, "x1"), (riscv64.core_reg, "regs"), (riscv64.core_reg, "PC"),
    (riscv64.csr_reg, "mstatus"), (riscv64.config_reg, "pc"), (riscv64.timer_reg, "sstatus"),
])
def test_an_unknown_register_name_is_a_clear_error(fn, name):
    with pytest.raises(ValueError, match="is not a riscv64"):
        fn(name)


@pytest.mark.parametrize("fn, ext, error", [
    (riscv64.isa_ext_reg, abi.KVM_RISCV_ISA_EXT_MAX, ValueError), (riscv64.isa_ext_reg, -1, ValueError),
    (riscv64.isa_ext_reg, "zzz", ValueError), (riscv64.isa_ext_reg, 1.0, TypeError),
    (riscv64.sbi_ext_reg, abi.KVM_RISCV_SBI_EXT_MAX, ValueError), (riscv64.sbi_ext_reg, True, TypeError),
])
def test_an_unknown_extension_is_refused(fn, ext, error):
    with pytest.raises(error):
        fn(ext)


# ---- the classes against a fake kernel ------------------------------------------------------

@pytest.fixture
def kernel(monkeypatch):
    return FakeKernel(abi, default_caps(abi)).install(monkeypatch)


@pytest.fixture
def vm(kernel):
    with Riscv64Kvm("/dev/null") as kvm, kvm.create_vm() as v:
        yield v


@pytest.fixture
def vcpu(vm):
    return vm.create_vcpu(0)


def only(kernel: FakeKernel, name: str, role: str) -> Call:
    """The one call of ioctl `name` on a `role` fd, checked against this arch's IOCTLS."""
    return only_call(kernel, abi, name, role)


def one_reg_file(kernel: FakeKernel, regs: dict[int, int]) -> None:
    one_reg_registers(kernel, abi, regs)


def test_the_classes_are_the_riscv64_ones(vm, vcpu):
    assert type(vm) is Riscv64Vm and type(vcpu) is Riscv64Vcpu and vm.vcpus == (vcpu,)


def test_core_registers_by_name_go_through_one_reg_at_64_bits(kernel, vcpu):
    regs = {riscv64.core_reg("pc"): 0, riscv64.core_reg("a0"): 0x8000_0000_0000_0001}
    one_reg_file(kernel, regs)
    vcpu.set_core_reg("pc", 0x8020_0000)
    assert vcpu.get_core_reg("a0") == 0x8000_0000_0000_0001
    assert regs[riscv64.core_reg("pc")] == 0x8020_0000
    get = only(kernel, "KVM_GET_ONE_REG", "vcpu").struct(abi.kvm_one_reg)
    assert get.id == riscv64.core_reg("regs.a0")
    with pytest.raises(OverflowError, match="64 bits"):
        vcpu.set_core_reg("pc", 1 << 64)
    with pytest.raises(ValueError, match="not a riscv64 core register"):
        vcpu.set_core_reg("x5", 0)
    assert len(kernel.calls_to("KVM_SET_ONE_REG")) == 1


def test_isa_extensions_are_switched_with_one_reg(kernel, vcpu):
    regs = {riscv64.isa_ext_reg("v"): 1, riscv64.isa_ext_reg("zba"): 0}
    one_reg_file(kernel, regs)
    vcpu.set_isa_ext("v", False)
    vcpu.set_isa_ext(abi.RiscvIsaExtId.ZBA, True)
    assert regs == {riscv64.isa_ext_reg("v"): 0, riscv64.isa_ext_reg("zba"): 1}
    assert vcpu.get_isa_ext("zba") is True and vcpu.get_isa_ext("v") is False
    with pytest.raises(KvmError) as e:          # the host lacks it: the kernel says ENOENT
        vcpu.get_isa_ext("h")
    assert e.value.errno == errno.ENOENT


def test_sbi_extensions_are_switched_with_one_reg(kernel, vcpu):
    regs = {riscv64.sbi_ext_reg("pmu"): 1}
    one_reg_file(kernel, regs)
    vcpu.set_sbi_ext("pmu", False)
    assert regs == {riscv64.sbi_ext_reg(abi.KVM_RISCV_SBI_EXT_PMU): 0}
    assert vcpu.get_sbi_ext("pmu") is False


def test_get_registers_reads_every_listed_register(kernel, vcpu):
    regs = {riscv64.core_reg("pc"): 0x8020_0000, riscv64.csr_reg("satp"): 0x8 << 60,
            riscv64.config_reg("isa"): 0x1412D, riscv64.timer_reg("frequency"): 10_000_000,
            riscv64.isa_ext_reg("c"): 1}
    one_reg_file(kernel, dict(regs))

    def answer(call: Call) -> int:
        assert call.arg is not None
        lst = abi.kvm_reg_list.from_address(call.arg)
        if lst.n < len(regs):
            lst.n = len(regs)
            raise OSError(errno.E2BIG, "")
        lst.n = len(regs)
        (ctypes.c_uint64 * len(regs)).from_address(call.arg + abi.kvm_reg_list.reg.offset)[:] = \
            list(regs)
        return 0
    kernel.handlers["KVM_GET_REG_LIST"] = answer
    assert vcpu.get_registers() == regs
    assert {c.number for c in kernel.calls_to("KVM_GET_REG_LIST", "vcpu")} == \
        {abi.IOCTLS["KVM_GET_REG_LIST"].number}


def test_set_registers_names_the_register_the_kernel_refused(kernel, vcpu):
    one_reg_file(kernel, {})
    with pytest.raises(KvmError, match=hex(riscv64.csr_reg("sstatus"))):
        vcpu.set_registers({riscv64.csr_reg("sstatus"): 0})


@pytest.mark.parametrize("raised, irq", [(True, "KVM_INTERRUPT_SET"), (False, "KVM_INTERRUPT_UNSET")])
def test_inject_interrupt_raises_and_lowers_the_external_interrupt(kernel, vcpu, raised, irq):
    vcpu.inject_interrupt(raised)
    call = only(kernel, "KVM_INTERRUPT", "vcpu")
    # -1U and -2U as the kernel reads them: a __u32.
    assert call.data == struct.pack("<I", getattr(abi, irq))
    assert call.data == struct.pack("<I", 0xFFFF_FFFF if raised else 0xFFFF_FFFE)


def test_set_guest_debug_uses_riscv64s_kvm_guest_debug(kernel, vcpu):
    vcpu.set_guest_debug(abi.KVM_GUESTDBG_ENABLE)
    dbg = only(kernel, "KVM_SET_GUEST_DEBUG", "vcpu").struct(abi.kvm_guest_debug)
    assert dbg.control == abi.KVM_GUESTDBG_ENABLE
    with pytest.raises(NotImplementedError, match="single-step"):
        vcpu.set_single_step()
    assert len(kernel.calls_to("KVM_SET_GUEST_DEBUG")) == 1


def test_mp_state_uses_the_same_numbers_as_riscv64s_table(kernel, vcpu):
    vcpu.get_mp_state()
    vcpu.set_mp_state(abi.MpState.STOPPED)
    only(kernel, "KVM_GET_MP_STATE", "vcpu")
    assert only(kernel, "KVM_SET_MP_STATE", "vcpu").data == struct.pack("<I", abi.KVM_MP_STATE_STOPPED)


def test_snapshots_are_refused_naming_what_is_not_saved(vm):
    with pytest.raises(NotImplementedError, match="x86_64 VMs; Riscv64Vm's state"):
        vm.save_state()
