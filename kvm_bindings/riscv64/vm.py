"""Riscv64Vm: a VM on a riscv64 host, whose vCPUs are Riscv64Vcpu."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, cast

from ..vm import Vm
from .vcpu import Riscv64Vcpu

if TYPE_CHECKING:
    from ..vcpu import Vcpu
    from .system import Riscv64Kvm

__all__ = ["Riscv64Vm"]


class Riscv64Vm(Vm):
    """A VM on a riscv64 host: everything Vm does, and Riscv64Vcpu vCPUs."""

    _vcpu_class: ClassVar[type[Vcpu]] = Riscv64Vcpu
    kvm: Riscv64Kvm

    def create_vcpu(self, vcpu_id: int) -> Riscv64Vcpu:
        """KVM_CREATE_VCPU: a Riscv64Vcpu (see Vm.create_vcpu)."""
        return cast(Riscv64Vcpu, super().create_vcpu(vcpu_id))    # _vcpu_class made it

    @property
    def vcpus(self) -> tuple[Riscv64Vcpu, ...]:
        """The open vCPUs, ordered by vCPU id."""
        return cast("tuple[Riscv64Vcpu, ...]", super().vcpus)
