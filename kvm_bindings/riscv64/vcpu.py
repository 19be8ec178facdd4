"""Riscv64Vcpu: the riscv64 calls of a vCPU (ONE_REG state, ISA and SBI extensions, the
external interrupt line, guest debug).

The core's calls (run, get/set_one_reg, get_reg_list, mp_state) use the host's ABI
module; the calls here use riscv64's, so their numbers and layouts are riscv64's
wherever this module is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._layout import fill
from ..abi import riscv64 as abi
from ..vcpu import Vcpu
from .regs import core_reg, isa_ext_reg, sbi_ext_reg

if TYPE_CHECKING:
    from .vm import Riscv64Vm

__all__ = ["Riscv64Vcpu"]


class Riscv64Vcpu(Vcpu):
    """A vCPU of a riscv64 VM: everything Vcpu does, and the riscv64-only vCPU calls.

    ISA and SBI extensions can be changed only before the vCPU first runs.
    """

    vm: Riscv64Vm

    # -- registers
    def get_core_reg(self, name: str) -> int:
        """A core register by name ("pc", "a0", "mode", ...; see riscv64.core_reg)."""
        return self.get_one_reg(core_reg(name))

    def set_core_reg(self, name: str, value: int) -> None:
        """Set a core register by name ("pc", "a0", "mode", ...; see riscv64.core_reg)."""
        self.set_one_reg(core_reg(name), value)


    # -- extensions
    def get_isa_ext(self, ext: int | str) -> bool:
        """Whether ISA extension ext (abi.riscv64.RiscvIsaExtId, or a name such as "zba") is
        enabled for this vCPU; KvmError ENOENT if the host lacks it."""
        return bool(self.get_one_reg(isa_ext_reg(ext)))

    def set_isa_ext(self, ext: int | str, enabled: bool) -> None:
        """Enable or disable ISA extension ext for this vCPU (before it first runs)."""
        self.set_one_reg(isa_ext_reg(ext), int(bool(enabled)))

    def get_sbi_ext(self, ext: int | str) -> bool:
        """Whether SBI extension ext (abi.riscv64.RiscvSbiExtId, or a name such as "hsm") is
        enabled for this vCPU."""
        return bool(self.get_one_reg(sbi_ext_reg(ext)))

    def set_sbi_ext(self, ext: int | str, enabled: bool) -> None:
        """Enable or disable SBI extension ext for this vCPU (before it first runs)."""
        self.set_one_reg(sbi_ext_reg(ext), int(bool(enabled)))

    # -- interrupts and debug
    def inject_interrupt(self, raised: bool = True) -> None:
        """KVM_INTERRUPT: raise (KVM_INTERRUPT_SET) or lower (KVM_INTERRUPT_UNSET) the vCPU's
        supervisor external interrupt, for a VMM that emulates the interrupt controller."""
        irq = abi.KVM_INTERRUPT_SET if raised else abi.KVM_INTERRUPT_UNSET
        self.ioctl(abi.KVM_INTERRUPT, fill(abi.kvm_interrupt, irq=irq))

    def set_guest_debug(self, control: int) -> None:
        """KVM_SET_GUEST_DEBUG (KVM_CAP_SET_GUEST_DEBUG) with riscv64's kvm_guest_debug:
        control is KVM_GUESTDBG_* bits (ENABLE: guest ebreak exits to the VMM)."""
        self.vm.require(abi.Capability.SET_GUEST_DEBUG, "KVM_SET_GUEST_DEBUG")
        self.ioctl(abi.KVM_SET_GUEST_DEBUG, fill(abi.kvm_guest_debug, control=control))

    def set_single_step(self, enabled: bool = True) -> None:
        """Not on riscv64: its KVM has no single-stepping (KVM_GUESTDBG_ENABLE only makes a
        guest ebreak exit), and a request for it would let the guest run on unnoticed."""
        raise NotImplementedError("KVM on riscv64 does not single-step a guest; "
                                  "set_guest_debug(KVM_GUESTDBG_ENABLE) makes ebreak exit")
