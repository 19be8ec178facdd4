"""Arm64Vm: the arm64 calls of a VM (the preferred vCPU target, the vGICv3)."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, ClassVar, cast

from .._layout import check_int
from ..abi import arm64 as abi
from ..device import Device
from ..errors import StaleHandleError
from ..vm import Vm
from .vcpu import Arm64Vcpu

if TYPE_CHECKING:
    from ..vcpu import Vcpu
    from .system import Arm64Kvm

__all__ = ["Arm64Vm"]

_U32 = ctypes.sizeof(ctypes.c_uint32)
_U64 = ctypes.sizeof(ctypes.c_uint64)


class Arm64Vm(Vm):
    """A VM on an arm64 host: everything Vm does, the arm64 VM ioctls, and Arm64Vcpu vCPUs."""

    _vcpu_class: ClassVar[type[Vcpu]] = Arm64Vcpu
    kvm: Arm64Kvm

    def create_vcpu(self, vcpu_id: int) -> Arm64Vcpu:
        """KVM_CREATE_VCPU: an Arm64Vcpu (see Vm.create_vcpu); call its vcpu_init() next."""
        return cast(Arm64Vcpu, super().create_vcpu(vcpu_id))    # _vcpu_class made it

    @property
    def vcpus(self) -> tuple[Arm64Vcpu, ...]:
        """The open vCPUs, ordered by vCPU id."""
        return cast("tuple[Arm64Vcpu, ...]", super().vcpus)

    @property
    def ipa_bits(self) -> int | None:
        """The guest physical address size the VM was created with (None: the default)."""
        return (self.vm_type & abi.KVM_VM_TYPE_ARM_IPA_SIZE_MASK) or None

    def preferred_target(self) -> abi.kvm_vcpu_init:
        """KVM_ARM_PREFERRED_TARGET -> kvm_vcpu_init: the target (and no features) for
        KVM_ARM_VCPU_INIT that best matches the host CPU."""
        return self._get(abi.KVM_ARM_PREFERRED_TARGET, abi.kvm_vcpu_init)

    # -- the in-kernel GICv3
    def create_vgic_v3(self, dist_addr: int, redist_addr: int,
                       nr_irqs: int | None = None) -> Device:
        """KVM_CREATE_DEVICE of a vGICv3 (KVM_DEV_TYPE_ARM_VGIC_V3, KVM_CAP_DEVICE_CTRL), its
        distributor at dist_addr and its redistributors (one per vCPU, contiguous) at
        redist_addr, both 64 KiB aligned; nr_irqs (KVM_DEV_ARM_VGIC_GRP_NR_IRQS) counts
        SGIs, PPIs and SPIs. Create the vCPUs, then call init_vgic()."""
        dist_addr = check_int(dist_addr, ctypes.c_uint64, "dist_addr")
        redist_addr = check_int(redist_addr, ctypes.c_uint64, "redist_addr")
        if nr_irqs is not None:
            nr_irqs = check_int(nr_irqs, ctypes.c_uint32, "nr_irqs")
        gic = self.create_device(abi.KVM_DEV_TYPE_ARM_VGIC_V3)
        try:
            if nr_irqs is not None:
                gic.set_attr(abi.KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, nr_irqs, size=_U32)
            gic.set_attr(abi.KVM_DEV_ARM_VGIC_GRP_ADDR, abi.KVM_VGIC_V3_ADDR_TYPE_DIST,
                         dist_addr, size=_U64)
            gic.set_attr(abi.KVM_DEV_ARM_VGIC_GRP_ADDR, abi.KVM_VGIC_V3_ADDR_TYPE_REDIST,
                         redist_addr, size=_U64)
        except BaseException:
            gic.close()
            raise
        return gic

    def init_vgic(self, gic: Device) -> None:
        """KVM_DEV_ARM_VGIC_CTRL_INIT: finish setting up a vGIC of this VM, after every vCPU
        exists and before any runs."""
        if not isinstance(gic, Device) or gic.vm is not self:
            raise StaleHandleError("init_vgic() takes a vGIC device this VM created")
        if gic.device_type not in (abi.KVM_DEV_TYPE_ARM_VGIC_V2, abi.KVM_DEV_TYPE_ARM_VGIC_V3):
            raise ValueError(f"device type {gic.device_type} is not a vGIC")
        gic.set_attr(abi.KVM_DEV_ARM_VGIC_GRP_CTRL, abi.KVM_DEV_ARM_VGIC_CTRL_INIT)
