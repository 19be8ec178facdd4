"""X86Kvm: the x86 calls of /dev/kvm (supported and emulated CPUID, MSR lists, feature MSRs,
the machine-check capabilities)."""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar, cast

from ..abi import x86_64 as abi
from ..errors import KvmError
from ..system import Kvm
from ..vm import Vm
from . import _cpuid, _msrs
from .vm import X86Vm

if TYPE_CHECKING:
    from ..backing import Backing
    from ..snapshot import VmState

__all__ = ["X86Kvm"]


class X86Kvm(Kvm):
    """/dev/kvm on an x86 host: everything Kvm does, the x86 queries, and X86Vm VMs."""

    _vm_class: ClassVar[type[Vm]] = X86Vm

    def create_vm(self, vm_type: int = 0) -> X86Vm:
        """KVM_CREATE_VM: an X86Vm. vm_type: 0, or a KVM_X86_*_VM type kvm.vm_types() lists."""
        return cast(X86Vm, super().create_vm(vm_type))    # _vm_class made it

    def restore_vm(self, state: VmState, *, memory: Mapping[int, Backing] | None = None,
                   check_cpu: bool = True, advance_clock: bool = False) -> X86Vm:
        """A new VM made from a snapshot (vm.save_state(), VmState.from_bytes()): its setup
        calls, memory slots and contents, vCPUs with their state, irqchip, PIT and clock,
        restored in the order KVM needs (kvm_bindings.x86.snapshot says why); ready to run.

        memory: {slot: Backing} for slots whose contents the caller carries (the backing
        is used as it is, holding the guest's memory). check_cpu: refuse a snapshot taken
        on another CPU vendor. advance_clock: the guest's kvmclock goes on by the wall-clock
        time since the save (a migration), not from where it stopped. The irqfds and
        ioeventfds in state.registrations are left to the caller. SnapshotError if the
        snapshot cannot be restored here; RestoreError (naming the step) if the kernel
        refuses part of it: the new VM is closed then.
        """
        from . import snapshot
        return snapshot.restore_vm(self, state, memory=memory, check_cpu=check_cpu,
                                   advance_clock=advance_clock)

    # -- CPUID and MSRs
    def _cpuid(self, number: int, name: str, cap: int, start: int = 64) -> abi.kvm_cpuid2:
        self.require(cap, name)
        return _cpuid.grown(lambda cpuid: self.ioctl(number, cpuid, name=name), start, 1 << 16)

    def get_supported_cpuid(self) -> abi.kvm_cpuid2:
        """KVM_GET_SUPPORTED_CPUID as a kvm_cpuid2 (entries: .flex_array())."""
        return self._cpuid(abi.KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID",
                           abi.Capability.EXT_CPUID)

    def get_emulated_cpuid(self) -> abi.kvm_cpuid2:
        """KVM_GET_EMULATED_CPUID: CPUID bits KVM can emulate even where hardware lacks them."""
        return self._cpuid(abi.KVM_GET_EMULATED_CPUID, "KVM_GET_EMULATED_CPUID",
                           abi.Capability.EXT_EMUL_CPUID)

    def get_supported_hv_cpuid(self) -> abi.kvm_cpuid2:
        """KVM_GET_SUPPORTED_HV_CPUID on /dev/kvm (KVM_CAP_SYS_HYPERV_CPUID): the Hyper-V
        CPUID leaves KVM can offer a guest, as a kvm_cpuid2."""
        return self._cpuid(abi.KVM_GET_SUPPORTED_HV_CPUID, "KVM_GET_SUPPORTED_HV_CPUID",
                           abi.Capability.SYS_HYPERV_CPUID, start=16)

    def get_mce_cap_supported(self) -> int:
        """KVM_X86_GET_MCE_CAP_SUPPORTED (KVM_CAP_MCE): the IA32_MCG_CAP bits a vCPU's
        machine-check unit can be given with vcpu.setup_mce() (kvm_bindings.x86.mce names
        them; the bank count in the low byte is 0 here: KVM_CAP_MCE's value is the most)."""
        self.require(abi.Capability.MCE, "KVM_X86_GET_MCE_CAP_SUPPORTED")
        caps = ctypes.c_uint64()
        self.ioctl(abi.KVM_X86_GET_MCE_CAP_SUPPORTED, caps)
        return caps.value

    def _index_list(self, number: int, name: str) -> list[int]:
        probe = abi.kvm_msr_list.alloc(0)
        try:
            self.ioctl(number, probe, name=name)
        except KvmError as e:
            # E2BIG, with nmsrs set to how many there are: the documented way to ask.
            if e.errno != errno.E2BIG:
                raise
        lst = abi.kvm_msr_list.alloc(probe.nmsrs)
        self.ioctl(number, lst, name=name)
        return [int(i) for i in lst.flex_array()]

    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM_GET_MSRS/KVM_SET_MSRS can access on a vCPU."""
        return self._index_list(abi.KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST")

    def get_msr_feature_index_list(self) -> list[int]:
        """KVM_GET_MSR_FEATURE_INDEX_LIST: MSRs that describe features (KVM_CAP_GET_MSR_FEATURES)."""
        self.require(abi.Capability.GET_MSR_FEATURES, "KVM_GET_MSR_FEATURE_INDEX_LIST")
        return self._index_list(abi.KVM_GET_MSR_FEATURE_INDEX_LIST,
                                "KVM_GET_MSR_FEATURE_INDEX_LIST")

    def get_feature_msrs(self, indices: list[int] | None = None) -> dict[int, int]:
        """Values of feature MSRs (KVM_GET_MSRS on /dev/kvm), all of them by default."""
        if indices is None:
            indices = self.get_msr_feature_index_list()
        msrs = _msrs.msrs(indices)
        return _msrs.msr_results(msrs, self.ioctl(abi.KVM_GET_MSRS, msrs))
