"""riscv64: the riscv64 classes (Riscv64Kvm -> Riscv64Vm -> Riscv64Vcpu) and ONE_REG ids.

Bring-up on a riscv64 host::

    kvm = Riscv64Kvm()
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    vcpu.set_isa_ext("v", False)          # before the first run
    vcpu.set_core_reg("pc", entry)
    vcpu.set_core_reg("a0", 0)            # hart id, by the boot convention

The register ids, numbers and layouts here come from kvm_bindings.abi.riscv64, which
imports on any host; the classes need a riscv64 /dev/kvm to do anything.
"""

from __future__ import annotations

from .regs import (
    CONFIG_REGS,
    CORE_REGS,
    CSRS,
    TIMER_REGS,
    config_reg,
    core_reg,
    csr_reg,
    isa_ext_reg,
    reg_size,
    sbi_ext_reg,
    timer_reg,
)
from .system import Riscv64Kvm
from .vcpu import Riscv64Vcpu
from .vm import Riscv64Vm

__all__ = [
    "CONFIG_REGS", "CORE_REGS", "CSRS", "Riscv64Kvm", "Riscv64Vcpu", "Riscv64Vm", "TIMER_REGS",
    "config_reg", "core_reg", "csr_reg", "isa_ext_reg", "reg_size", "sbi_ext_reg", "timer_reg",
]
