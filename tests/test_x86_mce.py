"""Machine checks (KVM_X86_GET_MCE_CAP_SUPPORTED, KVM_X86_SETUP_MCE, KVM_X86_SET_MCE), seen
by a long-mode guest: it reads IA32_MCG_CAP and the bank MSRs, and takes #MC in a handler
that reports what the bank holds. The MSR numbers and bits are the CPU's (x86.mce); what
the guest reads back is the kernel's answer."""

from __future__ import annotations

import ctypes
import errno
import fcntl

import pytest

from kvm_bindings import KvmError, KvmUnsupported, ShutdownExit, abi
from kvm_bindings.testing import MEMORY_SIZE, Sync, load_guest, ucalls
from kvm_bindings.testing import assemble as kit_assemble
from kvm_bindings.testing.ucall import UnexpectedExitError
from kvm_bindings.x86 import mce

from .conftest import no_ioctls, without_capability

# An IDT at 1 MiB whose vector 18 (#MC) goes to mc_handler. The handler reports
# IA32_MCG_STATUS, then STATUS, ADDR and MISC of the bank in %r12, then finishes.
PROLOGUE = r"""
    lea     mc_handler(%rip), %rax
    mov     $(0x100000 + 18 * 16), %rdi
    mov     %ax, (%rdi)
    mov     %cs, %cx
    mov     %cx, 2(%rdi)
    movw    $0x8e00, 4(%rdi)
    shr     $16, %rax
    mov     %ax, 6(%rdi)
    shr     $16, %rax
    mov     %eax, 8(%rdi)
    movl    $0, 12(%rdi)
    lidt    idtr(%rip)
    jmp     main

    .macro  rdmsr64 msr
    mov     \msr, %ecx
    rdmsr
    shl     $32, %rdx
    or      %rdx, %rax
    .endm

mc_handler:
    rdmsr64 $0x17a
    GUEST_SYNC(%rax)
    lea     0x401(, %r12, 4), %ecx
    rdmsr64 %ecx
    GUEST_SYNC(%rax)
    lea     0x402(, %r12, 4), %ecx
    rdmsr64 %ecx
    GUEST_SYNC(%rax)
    lea     0x403(, %r12, 4), %ecx
    rdmsr64 %ecx
    GUEST_SYNC(%rax)
    GUEST_DONE

    .balign 8
idtr:
    .word   256 * 16 - 1
    .quad   0x100000
"""

SET_CR4_MCE = r"""
    mov     %cr4, %rax
    or      $(1 << 6), %rax
    mov     %rax, %cr4
"""

UNCORRECTED = mce.MCI_STATUS_VAL | mce.MCI_STATUS_UC | mce.MCI_STATUS_EN | mce.MCI_STATUS_PCC \
    | mce.MCI_STATUS_ADDRV | mce.MCI_STATUS_MISCV | 0x0134      # 0x134: a memory read error
CORRECTED = mce.MCI_STATUS_VAL | mce.MCI_STATUS_EN | mce.MCI_STATUS_ADDRV | 0x009f


def _guest(vm, main: str):
    vm.add_memory(0x10000, MEMORY_SIZE - 0x10000)
    vcpu = vm.create_vcpu(0)
    load_guest(vcpu, kit_assemble(PROLOGUE + "main:\n" + main))
    return vcpu


def _syncs(vcpu, at=None, **kw):
    """The guest's Sync values; at(value) runs when the guest stops at each one."""
    values = []
    for event in ucalls(vcpu, timeout=10, **kw):
        if isinstance(event, Sync):
            values.append(event.value)
            if at:
                at(event.value)
    return values






# ---- what the host offers ------------------------------------------------------------------

def test_get_mce_cap_supported_is_what_the_kernel_writes_on_dev_kvm(kvm):
    raw = ctypes.c_uint64(0xDEAD)                   # the bare ioctl: the oracle
    fcntl.ioctl(kvm.fd, abi.KVM_X86_GET_MCE_CAP_SUPPORTED, raw)
    assert raw.value != 0xDEAD
    assert kvm.get_mce_cap_supported() == raw.value
    assert raw.value & mce.MCG_CAP_COUNT == 0        # flags only: the count is KVM_CAP_MCE's


def test_a_vcpu_starts_with_kvm_cap_mce_banks_and_no_flags(vm, kvm):
    vcpu = vm.create_vcpu(0)
    assert vcpu.get_msrs([mce.MSR_IA32_MCG_CAP]) == {mce.MSR_IA32_MCG_CAP:
                                                     kvm.check_extension(abi.Capability.MCE)}


# ---- setup_mce: the guest reads what was set -------------------------------------------------

def test_setup_mce_is_the_ia32_mcg_cap_the_guest_reads(vm, kvm):
    cap = 3 | kvm.get_mce_cap_supported()
    vcpu = _guest(vm, r"""
        rdmsr64 $0x179
        GUEST_SYNC(%rax)
        rdmsr64 $0x17b                  /* IA32_MCG_CTL, there with MCG_CTL_P */
        GUEST_SYNC(%rax)
        rdmsr64 $0x408                  /* MC2_CTL: the last bank's control, all ones */
        GUEST_SYNC(%rax)
        GUEST_DONE
    """)
    vcpu.setup_mce(cap)
    mcg_cap, mcg_ctl, mc2_ctl = _syncs(vcpu)
    assert mcg_cap == cap
    if cap & mce.MCG_CTL_P:
        assert mcg_ctl == 2**64 - 1
    assert mc2_ctl == 2**64 - 1


@pytest.mark.parametrize("banks", [0, "most+1"])
def test_setup_mce_refuses_a_bank_count_the_kernel_refuses(vm, kvm, banks):
    vcpu = vm.create_vcpu(0)
    most = kvm.check_extension(abi.Capability.MCE)
    banks = most + 1 if banks == "most+1" else banks
    with pytest.raises(KvmError) as kernel:          # the kernel's own answer, past our check
        vcpu.ioctl(abi.KVM_X86_SETUP_MCE, ctypes.c_uint64(banks))
    assert kernel.value.errno == errno.EINVAL
    with pytest.raises(ValueError, match=f"{banks} banks.*1 to {most}"):
        vcpu.setup_mce(banks)
    vcpu.setup_mce(most)                             # the edge it takes


def test_setup_mce_refuses_a_feature_bit_the_host_lacks(vm, kvm):
    vcpu = vm.create_vcpu(0)
    missing = [b for b in (mce.MCG_LMCE_P, mce.MCG_CMCI_P, mce.MCG_SER_P, mce.MCG_CTL_P, 1 << 40)
               if not b & kvm.get_mce_cap_supported()]
    assert missing                                   # bit 40 is never a feature
    for bit in missing:
        with pytest.raises(KvmError) as kernel:
            vcpu.ioctl(abi.KVM_X86_SETUP_MCE, ctypes.c_uint64(2 | bit))
        assert kernel.value.errno == errno.EINVAL
        with pytest.raises(ValueError, match=f"{bit:#x}"):
            vcpu.setup_mce(2 | bit)


@pytest.mark.parametrize("bad, kind", [("2", TypeError), (2.0, TypeError), (True, TypeError),
                                       (-1, OverflowError), (2**64, OverflowError)])
def test_setup_mce_refuses_what_is_not_a_u64_before_any_ioctl(vm, monkeypatch, bad, kind):
    vcpu = vm.create_vcpu(0)
    issued = no_ioctls(monkeypatch, vcpu)
    with pytest.raises(kind):
        vcpu.setup_mce(bad)
    assert issued == []


# ---- inject_mce: #MC in the guest ------------------------------------------------------------

def test_an_uncorrected_error_raises_mc_with_the_bank_as_injected(vm):
    vcpu = _guest(vm, SET_CR4_MCE + r"""
        mov     $1, %r12
        GUEST_SYNC($0xaaaa)             /* the host injects here */
        GUEST_FAIL("no machine check came")
    """)
    vcpu.setup_mce(4)                   # reporting on in every bank
    status, addr, misc = UNCORRECTED, 0x1234000, 0x86
    mcg_status = mce.MCG_STATUS_MCIP | mce.MCG_STATUS_EIPV

    def inject(value):
        if value == 0xAAAA:
            assert vcpu.inject_mce(1, status, addr=addr, misc=misc, mcg_status=mcg_status)
    assert _syncs(vcpu, inject) == [0xAAAA, mcg_status, status, addr, misc]


def test_an_uncorrected_error_over_a_full_bank_is_marked_overwritten(vm):
    vcpu = _guest(vm, SET_CR4_MCE + r"""
        mov     $2, %r12
        GUEST_SYNC($0xaaaa)
        GUEST_FAIL("no machine check came")
    """)
    vcpu.setup_mce(4)

    def inject(value):
        if value == 0xAAAA:
            assert vcpu.inject_mce(2, CORRECTED, addr=0x1000)       # fills bank 2, no #MC
            assert vcpu.inject_mce(2, UNCORRECTED, addr=0x2000)
    syncs = _syncs(vcpu, inject)
    assert syncs[2] == UNCORRECTED | mce.MCI_STATUS_OVER
    assert syncs[3] == 0x2000


def test_a_corrected_error_fills_the_bank_for_polling_without_mc(vm):
    vcpu = _guest(vm, SET_CR4_MCE + r"""
        GUEST_SYNC($0xaaaa)
        rdmsr64 $0x40d                  /* MC3_STATUS */
        GUEST_SYNC(%rax)
        rdmsr64 $0x40e                  /* MC3_ADDR */
        GUEST_SYNC(%rax)
        GUEST_SYNC($0xbbbb)
        rdmsr64 $0x40d
        GUEST_SYNC(%rax)
        GUEST_DONE
    """)

    def inject(value):          # no setup_mce(): corrected errors need no reporting on
        if value in (0xAAAA, 0xBBBB):
            assert vcpu.inject_mce(3, CORRECTED, addr=0x5000 if value == 0xAAAA else 0x6000)
    assert _syncs(vcpu, inject) == [0xAAAA, CORRECTED, 0x5000, 0xBBBB,
                                    CORRECTED | mce.MCI_STATUS_OVER]


def test_an_uncorrected_error_without_cr4_mce_shuts_the_vcpu_down(vm):
    vcpu = _guest(vm, r"""
        GUEST_SYNC($0xaaaa)
        GUEST_FAIL("went on after the machine check")
    """)
    vcpu.setup_mce(4)

    def inject(value):
        assert not vcpu.inject_mce(1, UNCORRECTED)
    with pytest.raises(UnexpectedExitError) as stop:
        _syncs(vcpu, inject)
    assert isinstance(stop.value.exit, ShutdownExit)


def test_an_uncorrected_error_is_dropped_while_the_guest_masks_the_bank(vm):
    vcpu = _guest(vm, SET_CR4_MCE + r"""
        mov     $2, %r12
        mov     $0x404, %ecx            /* MC1_CTL = 0: bank 1 reports nothing */
        xor     %eax, %eax
        xor     %edx, %edx
        wrmsr
        GUEST_SYNC($0xaaaa)
        rdmsr64 $0x405
        GUEST_SYNC(%rax)
        GUEST_FAIL("no machine check came from bank 2")
    """)

    vcpu.setup_mce(4)

    def inject(value):
        if value == 0xAAAA:
            assert not vcpu.inject_mce(1, UNCORRECTED)
            assert vcpu.get_msrs([0x405]) == {0x405: 0}
            assert vcpu.inject_mce(2, UNCORRECTED | (1 << 32))   # bank 2 still reports
    # The #MC from bank 2 comes before the guest reads bank 1: the handler's four syncs.
    assert _syncs(vcpu, inject) == [0xAAAA, mce.MCG_STATUS_MCIP | mce.MCG_STATUS_EIPV,
                                    UNCORRECTED | (1 << 32), 0, 0]


def test_a_vcpus_banks_report_no_uncorrected_error_until_setup_mce(vm):
    vcpu = vm.create_vcpu(0)
    assert not vcpu.inject_mce(1, UNCORRECTED)
    assert vcpu.get_msrs([mce.msr_mc_status(1)]) == {mce.msr_mc_status(1): 0}
    vcpu.setup_mce(4)
    vcpu.set_sregs(_with_cr4_mce(vcpu.get_sregs()))
    assert vcpu.inject_mce(1, UNCORRECTED)
    assert vcpu.get_msrs([mce.msr_mc_status(1)]) == {mce.msr_mc_status(1): UNCORRECTED}


def _with_cr4_mce(sregs):
    sregs.cr4 |= 1 << 6
    return sregs


def test_inject_mce_refuses_a_bank_the_vcpu_lacks_as_the_kernel_does(vm):
    vcpu = vm.create_vcpu(0)
    vcpu.setup_mce(3)
    with pytest.raises(KvmError) as kernel:
        vcpu.ioctl(abi.KVM_X86_SET_MCE, abi.kvm_x86_mce(bank=3, status=CORRECTED))
    assert kernel.value.errno == errno.EINVAL
    with pytest.raises(ValueError, match=r"bank 3.*3 machine-check banks \(0 to 2"):
        vcpu.inject_mce(3, CORRECTED)
    assert vcpu.inject_mce(2, CORRECTED)
    assert vcpu.get_msrs([mce.msr_mc_status(2)]) == {mce.msr_mc_status(2): CORRECTED}


def test_inject_mce_refuses_a_status_without_val_as_the_kernel_does(vm):
    vcpu = vm.create_vcpu(0)
    status = CORRECTED & ~mce.MCI_STATUS_VAL
    with pytest.raises(KvmError) as kernel:
        vcpu.ioctl(abi.KVM_X86_SET_MCE, abi.kvm_x86_mce(bank=1, status=status))
    assert kernel.value.errno == errno.EINVAL
    with pytest.raises(ValueError, match="MCI_STATUS_VAL"):
        vcpu.inject_mce(1, status)


@pytest.mark.parametrize("field, bad, kind", [("bank", 256, OverflowError), ("bank", -1, OverflowError),
                                              ("status", 2**64, OverflowError),
                                              ("addr", "0", TypeError), ("misc", 1.0, TypeError),
                                              ("mcg_status", None, TypeError)])
def test_inject_mce_refuses_out_of_range_fields_before_any_ioctl(vm, monkeypatch, field, bad, kind):
    vcpu = vm.create_vcpu(0)
    issued = no_ioctls(monkeypatch, vcpu)
    args = {"bank": 1, "status": CORRECTED, "addr": 0, "misc": 0, "mcg_status": 0}
    args[field] = bad
    bank, status = args.pop("bank"), args.pop("status")
    with pytest.raises(kind):
        vcpu.inject_mce(bank, status, **args)
    assert issued == []


def test_inject_mce_sends_every_field_where_kvm_x86_mce_has_it(vm, monkeypatch):
    vcpu = vm.create_vcpu(0)
    monkeypatch.setattr(vcpu, "get_msrs", lambda idx: dict.fromkeys(idx, 0) | {mce.MSR_IA32_MCG_CAP: 32})
    issued = no_ioctls(monkeypatch, vcpu)
    vcpu.inject_mce(7, UNCORRECTED, addr=0x1111, misc=0x2222, mcg_status=0x5)
    [(number, req)] = issued
    assert number == abi.KVM_X86_SET_MCE
    raw = ctypes.string_at(ctypes.addressof(req), ctypes.sizeof(abi.kvm_x86_mce))
    def at(name, size):
        off = getattr(abi.kvm_x86_mce, name).offset
        return int.from_bytes(raw[off:off + size], "little")
    assert (at("status", 8), at("addr", 8), at("misc", 8), at("mcg_status", 8), at("bank", 1)) \
        == (UNCORRECTED, 0x1111, 0x2222, 0x5, 7)
    fields = {name: (getattr(abi.kvm_x86_mce, name).offset, size)
              for name, size in (("status", 8), ("addr", 8), ("misc", 8), ("mcg_status", 8),
                                 ("bank", 1))}
    rest = [b for i, b in enumerate(raw) if not any(o <= i < o + n for o, n in fields.values())]
    assert len(rest) == ctypes.sizeof(abi.kvm_x86_mce) - 33 and not any(rest)   # padding zeroed


# ---- without KVM_CAP_MCE -------------------------------------------------------------------

def test_the_mce_calls_name_kvm_cap_mce_where_it_is_missing(kvm, vm, monkeypatch):
    vcpu = vm.create_vcpu(0)
    without_capability(monkeypatch, kvm, abi.Capability.MCE)
    without_capability(monkeypatch, vm, abi.Capability.MCE)
    issued = no_ioctls(monkeypatch, kvm, vcpu)
    for call in (kvm.get_mce_cap_supported, lambda: vcpu.setup_mce(2),
                 lambda: vcpu.inject_mce(1, CORRECTED)):
        with pytest.raises(KvmUnsupported, match="KVM_CAP_MCE"):
            call()
    assert issued == []


# ---- snapshots -----------------------------------------------------------------------------

def test_a_snapshot_keeps_the_bank_count_and_what_the_banks_hold(kvm, vm):
    vcpu = vm.create_vcpu(0)
    cap = 5 | (kvm.get_mce_cap_supported() & mce.MCG_CTL_P)
    vcpu.setup_mce(cap)
    vcpu.set_sregs(_with_cr4_mce(vcpu.get_sregs()))
    assert vcpu.inject_mce(4, UNCORRECTED, addr=0xABC000, misc=0x86)
    assert vcpu.inject_mce(2, CORRECTED, addr=0x5000)
    vcpu.set_msrs({mce.msr_mc_ctl(3): 0})             # the guest turned bank 3 off
    banks = [f(b) for b in range(5) for f in (mce.msr_mc_ctl, mce.msr_mc_status,
                                               mce.msr_mc_addr, mce.msr_mc_misc)]
    watched = [mce.MSR_IA32_MCG_CAP, mce.MSR_IA32_MCG_STATUS, *banks]
    before = vcpu.get_msrs(watched)
    assert before[mce.msr_mc_status(4)] == UNCORRECTED and before[mce.msr_mc_ctl(3)] == 0
    state = vm.save_state()
    with kvm.restore_vm(state) as copy:
        assert copy.vcpus[0].get_msrs(watched) == before
    # And in place, over banks changed since the save.
    assert vcpu.inject_mce(1, CORRECTED)
    vcpu.set_msrs({mce.msr_mc_ctl(3): 2**64 - 1})
    vm.load_state(state)
    assert vcpu.get_msrs(watched) == before
