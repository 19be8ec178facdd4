"""The arm64 calls (Arm64Vm, Arm64Vcpu), declared as kvm_bindings._calls declares the
arch-neutral ones."""

from __future__ import annotations

from .._calls import Call

__all__ = ["CALLS"]

CALLS: tuple[Call, ...] = (
    Call("vm", "vm.preferred_target", ("KVM_ARM_PREFERRED_TARGET",), None),
    Call("vcpu", "vcpu.vcpu_init", ("KVM_ARM_VCPU_INIT",), None),
    Call("vcpu", "vcpu.finalize", ("KVM_ARM_VCPU_FINALIZE",), None),
    Call("vcpu", "vcpu.get_vcpu_events", ("KVM_GET_VCPU_EVENTS",), "KVM_CAP_VCPU_EVENTS"),
    Call("vcpu", "vcpu.set_vcpu_events", ("KVM_SET_VCPU_EVENTS",), "KVM_CAP_VCPU_EVENTS"),
)
