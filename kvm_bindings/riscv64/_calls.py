"""The riscv64 calls (Riscv64Vcpu), declared as kvm_bindings._calls declares the
arch-neutral ones."""

from __future__ import annotations

from .._calls import Call

__all__ = ["CALLS"]

CALLS: tuple[Call, ...] = (
    Call("vcpu", "vcpu.inject_interrupt", ("KVM_INTERRUPT",), None),
)
