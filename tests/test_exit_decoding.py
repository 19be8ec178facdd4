"""Every exit reason decodes into its own object carrying its kvm_run member's fields.

Guests cannot be made to produce every exit on x86 (s390 and RISC-V SBI exits, say),
so here the kvm_run page of a real vCPU is filled through the generated ctypes
view and decoded as KVM_RUN would have left it.
"""

from __future__ import annotations

import ctypes

import pytest

from kvm_bindings import ExitReason, abi, exits
from kvm_bindings._layout import member, offset_of

WITH_MEMBER = [r for r in ExitReason if f"KVM_EXIT_{r.name}" in abi.EXIT_MEMBERS
               and r.name not in ("IO", "MMIO")]


def _fill(vcpu, reason) -> tuple[int, int]:
    """Write a byte pattern over the reason's member; return (offset, size) of it."""
    name = abi.EXIT_MEMBERS[f"KVM_EXIT_{reason.name}"]
    off, t = offset_of(abi.kvm_run, name), member(abi.kvm_run, name)[1]
    page = vcpu._page
    page[off:off + ctypes.sizeof(t)] = bytes((i * 7 + 3) & 0xFF for i in range(ctypes.sizeof(t)))
    vcpu.kvm_run.exit_reason = int(reason)
    return off, ctypes.sizeof(t)


@pytest.mark.parametrize("reason", WITH_MEMBER, ids=lambda r: r.name)
def test_payload_exit_copies_its_member(vm, reason):
    vcpu = vm.create_vcpu(0)
    off, size = _fill(vcpu, reason)
    e = vcpu._decoder.decode(vcpu._decoder.reason())
    assert e.reason is reason and type(e) is exits.EXIT_CLASSES[reason]
    assert isinstance(e, exits.PayloadExit)
    assert bytes(e.payload) == bytes(vcpu._page[off:off + size])
    vcpu._page[off:off + size] = bytes(size)        # a copy: later runs do not change it
    assert bytes(e.payload) != bytes(size)
    assert type(e)._field_names                      # the class declares the member's fields
    for name in type(e)._field_names:
        getattr(e, name)                             # and each reads from the decoded copy
    assert reason.name in repr(e)


@pytest.mark.parametrize("reason", [r for r in ExitReason if r not in WITH_MEMBER
                                    and r.name not in ("IO", "MMIO")], ids=lambda r: r.name)
def test_exit_without_a_member_carries_its_reason(vm, reason):
    vcpu = vm.create_vcpu(0)
    vcpu.kvm_run.exit_reason = int(reason)
    e = vcpu._decoder.decode(vcpu._decoder.reason())
    assert e.reason is reason and isinstance(e, exits.SimpleExit)


def test_system_event_and_internal_error_decode_their_enums_and_data(vm):
    vcpu = vm.create_vcpu(0)
    run = vcpu.kvm_run
    run.exit_reason = int(ExitReason.SYSTEM_EVENT)
    run.system_event.type = abi.KVM_SYSTEM_EVENT_RESET
    run.system_event.ndata = 2
    run.system_event.data[0], run.system_event.data[1] = 11, 22
    e = vcpu._decoder.decode(vcpu._decoder.reason())
    assert e.type is abi.SystemEvent.RESET and e.data == [11, 22]

    run.exit_reason = int(ExitReason.INTERNAL_ERROR)
    run.internal.suberror = abi.KVM_INTERNAL_ERROR_EMULATION
    run.internal.ndata = 1
    run.internal.data[0] = 0x99
    e = vcpu._decoder.decode(vcpu._decoder.reason())
    assert e.suberror is abi.InternalError.EMULATION and e.data == [0x99]


def test_hypercall_reply_lands_in_kvm_run(vm):
    vcpu = vm.create_vcpu(0)
    vcpu.kvm_run.exit_reason = int(ExitReason.HYPERCALL)
    vcpu.kvm_run.hypercall.nr = 12
    e = vcpu._decoder.decode(vcpu._decoder.reason())
    assert e.nr == 12
    e.reply(0x1234)
    assert vcpu.kvm_run.hypercall.ret == 0x1234 and e.ret == 0x1234
