"""Arm64Vcpu: the arm64 calls of a vCPU (KVM_ARM_VCPU_INIT, finalize, ONE_REG state, events,
guest debug).

The core's calls (run, get/set_one_reg, get_reg_list, mp_state) use the host's ABI
module; the calls here use arm64's, so their numbers and layouts are arm64's wherever
this module is imported.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .._layout import check_field, check_int, expect, fill
from ..abi import arm64 as abi
from ..vcpu import Vcpu
from .regs import core_reg

if TYPE_CHECKING:
    from .vm import Arm64Vm

__all__ = ["Arm64Vcpu"]


class Arm64Vcpu(Vcpu):
    """A vCPU of an arm64 VM: everything Vcpu does, and the arm64-only vCPU ioctls.

    A new vCPU must be initialised with vcpu_init() before it runs or its registers
    are read (the kernel says ENOEXEC until then).
    """

    vm: Arm64Vm

    # -- bring-up
    def vcpu_init(self, target: int | None = None, features: Iterable[int] = ()) -> None:
        """KVM_ARM_VCPU_INIT: reset the vCPU as `target` (default: vm.preferred_target())
        with these features, given as bit numbers (abi.arm64.KVM_ARM_VCPU_PSCI_0_2, ...)."""
        if target is None:
            target = int(self.vm.preferred_target().target)
        init = fill(abi.kvm_vcpu_init, target=target)
        nbits = len(init.features) * ctypes.sizeof(init.features._type_) * 8
        for bit in features:
            if isinstance(bit, bool) or not isinstance(bit, int):
                raise TypeError(f"features are bit numbers (ints), not {type(bit).__name__}")
            if not 0 <= bit < nbits:
                raise ValueError(f"feature bit {bit} is out of range: kvm_vcpu_init.features "
                                 f"has bits 0..{nbits - 1}")
            word, shift = divmod(bit, ctypes.sizeof(init.features._type_) * 8)
            init.features[word] |= 1 << shift
        self.ioctl(abi.KVM_ARM_VCPU_INIT, init)

    def finalize(self, feature: int) -> None:
        """KVM_ARM_VCPU_FINALIZE: fix a feature's configuration after vcpu_init() and before
        the first run (today only abi.arm64.KVM_ARM_VCPU_SVE, with KVM_CAP_ARM_SVE)."""
        self.ioctl(abi.KVM_ARM_VCPU_FINALIZE, ctypes.c_int(check_int(feature, ctypes.c_int, "feature")))

    # -- registers
    def get_core_reg(self, name: str) -> int:
        """A core register by name ("x0", "pc", "v0", ...; see arm64.core_reg)."""
        return self.get_one_reg(core_reg(name))

    def set_core_reg(self, name: str, value: int) -> None:
        """Set a core register by name ("pc", "x0", ...; see arm64.core_reg)."""
        self.set_one_reg(core_reg(name), value)


    # -- events and debug
    def get_vcpu_events(self) -> abi.kvm_vcpu_events:
        """KVM_GET_VCPU_EVENTS -> arm64's kvm_vcpu_events (pending SError) (KVM_CAP_VCPU_EVENTS)."""
        self.vm.require(abi.Capability.VCPU_EVENTS, "KVM_GET_VCPU_EVENTS")
        return self._get(abi.KVM_GET_VCPU_EVENTS, abi.kvm_vcpu_events)

    def set_vcpu_events(self, events: abi.kvm_vcpu_events) -> None:
        """KVM_SET_VCPU_EVENTS: make an SError (serror_has_esr needs
        KVM_CAP_ARM_INJECT_SERROR_ESR) or an external data abort pending (KVM_CAP_VCPU_EVENTS)."""
        self.vm.require(abi.Capability.VCPU_EVENTS, "KVM_SET_VCPU_EVENTS")
        self.ioctl(abi.KVM_SET_VCPU_EVENTS, expect(events, abi.kvm_vcpu_events, "set_vcpu_events()"))

    def set_guest_debug(self, control: int, *, dbg_bcr: Iterable[int] = (),
                        dbg_bvr: Iterable[int] = (), dbg_wcr: Iterable[int] = (),
                        dbg_wvr: Iterable[int] = ()) -> None:
        """KVM_SET_GUEST_DEBUG (KVM_CAP_SET_GUEST_DEBUG) with arm64's kvm_guest_debug: control
        is KVM_GUESTDBG_* bits (USE_SW_BP, USE_HW, SINGLESTEP with ENABLE); with USE_HW the
        hardware breakpoint (bcr/bvr) and watchpoint (wcr/wvr) registers, first ones first."""
        self.vm.require(abi.Capability.SET_GUEST_DEBUG, "KVM_SET_GUEST_DEBUG")
        dbg = fill(abi.kvm_guest_debug, control=control)
        for name, values in (("dbg_bcr", dbg_bcr), ("dbg_bvr", dbg_bvr), ("dbg_wcr", dbg_wcr),
                             ("dbg_wvr", dbg_wvr)):
            slots = getattr(dbg.arch, name)
            given = list(values)
            if len(given) > len(slots):
                raise ValueError(f"at most {len(slots)} {name} values, not {len(given)}")
            for i, value in enumerate(given):
                slots[i] = check_field(value, abi.kvm_guest_debug_arch, name, f"{name}[{i}]", index=i)
        self.ioctl(abi.KVM_SET_GUEST_DEBUG, dbg)

    def set_single_step(self, enabled: bool = True) -> None:
        """Exit with KVM_EXIT_DEBUG after every guest instruction (or stop doing so)."""
        self.set_guest_debug(abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_SINGLESTEP if enabled else 0)
