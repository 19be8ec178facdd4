"""arm64: the arm64 classes (Arm64Kvm -> Arm64Vm -> Arm64Vcpu) and ONE_REG register ids.

Bring-up on an arm64 host::

    kvm = Arm64Kvm()
    vm = kvm.create_vm(ipa_bits=40)
    vcpu = vm.create_vcpu(0)
    vcpu.vcpu_init(features=[abi.arm64.KVM_ARM_VCPU_PSCI_0_2])
    vcpu.set_core_reg("pc", entry)

The register ids, numbers and layouts here come from kvm_bindings.abi.arm64, which
imports on any host; the classes need an arm64 /dev/kvm to do anything.
"""

from __future__ import annotations

from .regs import (
    CORE_REG_PATHS,
    CORE_REGS,
    core_reg,
    irq_line,
    reg_size,
    sve_ffr,
    sve_preg,
    sve_zreg,
    sys_reg,
)
from .system import Arm64Kvm, vm_type_ipa_size
from .vcpu import Arm64Vcpu
from .vm import Arm64Vm

__all__ = [
    "CORE_REGS", "CORE_REG_PATHS", "Arm64Kvm", "Arm64Vcpu", "Arm64Vm", "core_reg", "irq_line",
    "reg_size", "sve_ffr", "sve_preg", "sve_zreg", "sys_reg", "vm_type_ipa_size",
]
