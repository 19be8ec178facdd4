"""Riscv64Kvm: /dev/kvm on a riscv64 host, making Riscv64Vm VMs."""

from __future__ import annotations

from typing import ClassVar, cast

from ..system import Kvm
from ..vm import Vm
from .vm import Riscv64Vm

__all__ = ["Riscv64Kvm"]


class Riscv64Kvm(Kvm):
    """/dev/kvm on a riscv64 host: everything Kvm does, and Riscv64Vm VMs."""

    _vm_class: ClassVar[type[Vm]] = Riscv64Vm

    def create_vm(self, vm_type: int = 0) -> Riscv64Vm:
        """KVM_CREATE_VM: a Riscv64Vm (riscv64 has one VM type, 0)."""
        return cast(Riscv64Vm, super().create_vm(vm_type))    # _vm_class made it
