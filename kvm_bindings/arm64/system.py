"""Arm64Kvm: /dev/kvm on an arm64 host, whose VM type carries the guest's IPA size."""

from __future__ import annotations

import ctypes
import errno
from typing import ClassVar, cast

from .._layout import check_int
from ..abi import arm64 as abi
from ..errors import KvmError, KvmUnsupported
from ..system import Kvm
from ..vm import Vm
from .vm import Arm64Vm

__all__ = ["Arm64Kvm", "vm_type_ipa_size"]


def vm_type_ipa_size(ipa_bits: int) -> int:
    """KVM_VM_TYPE_ARM_IPA_SIZE(ipa_bits): the IPA-size field of an arm64 VM type. The C
    macro masks what does not fit; here that is a ValueError."""
    if isinstance(ipa_bits, bool) or not isinstance(ipa_bits, int):
        raise TypeError(f"ipa_bits must be an integer, not {type(ipa_bits).__name__}")
    if not 0 < ipa_bits <= abi.KVM_VM_TYPE_ARM_IPA_SIZE_MASK:
        raise ValueError(f"ipa_bits={ipa_bits} does not fit the VM type's IPA-size field "
                         f"(1..{abi.KVM_VM_TYPE_ARM_IPA_SIZE_MASK})")
    return ipa_bits & abi.KVM_VM_TYPE_ARM_IPA_SIZE_MASK


class Arm64Kvm(Kvm):
    """/dev/kvm on an arm64 host: everything Kvm does, and Arm64Vm VMs."""

    _vm_class: ClassVar[type[Vm]] = Arm64Vm

    def max_ipa_bits(self) -> int:
        """KVM_CAP_ARM_VM_IPA_SIZE: the largest guest physical address size, in bits, a VM
        can ask for (0: the kernel only gives the default size)."""
        return self.check_extension(abi.Capability.ARM_VM_IPA_SIZE)

    def create_vm(self, vm_type: int = 0, *, ipa_bits: int | None = None) -> Arm64Vm:
        """KVM_CREATE_VM: an Arm64Vm whose guest physical addresses have ipa_bits bits
        (KVM_VM_TYPE_ARM_IPA_SIZE, KVM_CAP_ARM_VM_IPA_SIZE); None leaves the kernel's default.
        vm_type may add other type bits (KVM_VM_TYPE_ARM_PROTECTED)."""
        vm_type = check_int(vm_type, ctypes.c_ulong, "vm_type")
        if ipa_bits is not None:
            ipa_bits = check_int(ipa_bits, ctypes.c_ulong, "ipa_bits")
            if vm_type & abi.KVM_VM_TYPE_ARM_IPA_SIZE_MASK:
                raise ValueError("give the IPA size once: in ipa_bits or in vm_type, not both")
            if not 0 < ipa_bits <= abi.KVM_VM_TYPE_ARM_IPA_SIZE_MASK:
                raise ValueError(f"ipa_bits={ipa_bits} does not fit the VM type's IPA size field "
                                 f"(1..{abi.KVM_VM_TYPE_ARM_IPA_SIZE_MASK}); "
                                 f"use None for the kernel's default")
            vm_type |= vm_type_ipa_size(ipa_bits)
        requested = vm_type & abi.KVM_VM_TYPE_ARM_IPA_SIZE_MASK     # the field, as given
        if requested:
            limit = self.max_ipa_bits()
            if not limit:
                raise KvmUnsupported(f"a {requested}-bit IPA size", "KVM_CAP_ARM_VM_IPA_SIZE")
            if requested > limit:
                raise ValueError(f"ipa_bits={requested} is more than this host supports: "
                                 f"KVM_CAP_ARM_VM_IPA_SIZE is {limit}")
        try:
            return cast(Arm64Vm, super().create_vm(vm_type))    # _vm_class made it
        except KvmError as e:
            if e.errno != errno.EINVAL or not requested:
                raise
            # The kernel's lower bound (32 bits, per the KVM API documentation) is not in
            # the uapi headers: say what EINVAL most likely means.
            raise KvmError("KVM_CREATE_VM", errno.EINVAL,
                           f"ipa_bits={requested} refused: the kernel accepts sizes from 32 bits "
                           f"up to KVM_CAP_ARM_VM_IPA_SIZE") from None
