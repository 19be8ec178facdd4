"""Kvm: the /dev/kvm system fd (kvm_dev_ioctl in the kernel)."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from typing import ClassVar

from . import abi
from ._fd import CapabilityOwner
from ._layout import check_int
from .errors import KvmError, KvmUnavailable
from .vm import Vm

DEFAULT_PATH = "/dev/kvm"


class Kvm(CapabilityOwner):
    """The KVM subsystem: capabilities, CPUID and MSR lists, and VM creation.

    Opens /dev/kvm with O_RDWR | O_CLOEXEC and checks KVM_GET_API_VERSION.
    """

    #: What create_vm() makes: an arch's Kvm names its own Vm class.
    _vm_class: ClassVar[type[Vm]] = Vm

    def __init__(self, path: str = DEFAULT_PATH) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise KvmUnavailable(path, e.errno or errno.ENODEV) from None
        super().__init__(fd)
        self.path = path
        self._caps: dict[int, int] = {}
        self._mmap_size: int | None = None
        try:
            if not stat.S_ISCHR(os.fstat(fd).st_mode):
                raise KvmUnavailable(path, errno.ENODEV, "it is not a character device")
            try:
                self.api_version = self.ioctl(abi.KVM_GET_API_VERSION)
            except KvmError as e:
                # A device that does not know KVM's ioctls (/dev/null, a tty...) says ENOTTY
                # or EINVAL: the path is wrong, which is a missing KVM, not a failed ioctl.
                if e.errno not in (errno.ENOTTY, errno.EINVAL):
                    raise
                raise KvmUnavailable(path, errno.ENODEV,
                                     "it does not answer KVM_GET_API_VERSION: not a KVM device"
                                     ) from None
            if self.api_version != abi.KVM_API_VERSION:
                raise KvmError("KVM_GET_API_VERSION", errno.EPROTO,
                               f"kernel speaks KVM API {self.api_version}, these bindings "
                               f"{abi.KVM_API_VERSION}")
        except BaseException:
            self.close()
            raise

    # -- capabilities
    def capabilities(self) -> dict[abi.Capability, int]:
        """Every capability the bindings know, with this kernel's value for it."""
        return {cap: self.check_extension(cap) for cap in abi.Capability}

    def get_vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to mmap on each vCPU fd (kvm_run and rings); asked once."""
        if self._mmap_size is None:
            self._mmap_size = self.ioctl(abi.KVM_GET_VCPU_MMAP_SIZE)
        return self._mmap_size

    def recommended_vcpus(self) -> int:
        """KVM_CAP_NR_VCPUS: how many vCPUs a VM should have at most (4 if unknown)."""
        return self.check_extension(abi.Capability.NR_VCPUS) or 4

    def max_vcpus(self) -> int:
        """KVM_CAP_MAX_VCPUS: how many vCPUs a VM can have."""
        return self.check_extension(abi.Capability.MAX_VCPUS) or self.recommended_vcpus()

    def max_vcpu_id(self) -> int:
        """KVM_CAP_MAX_VCPU_ID: vCPU ids must be below this."""
        return self.check_extension(abi.Capability.MAX_VCPU_ID) or self.max_vcpus()

    # -- VMs
    def vm_types(self) -> int:
        """Bitmask of VM types KVM_CREATE_VM accepts (KVM_CAP_VM_TYPES), bit 0 if unknown."""
        return self.check_extension(abi.Capability.VM_TYPES) or 1

    def create_vm(self, vm_type: int = 0) -> Vm:
        """KVM_CREATE_VM: a new VM ("kvm-vm" anonymous fd) of this arch's Vm class."""
        fd = self.ioctl(abi.KVM_CREATE_VM, check_int(vm_type, ctypes.c_ulong, "vm_type"))
        return self._vm_class(self, fd, vm_type)   # it owns fd from its first line, even if it fails

    def __repr__(self) -> str:
        if getattr(self, "_closing", True) or not hasattr(self, "api_version"):
            return "<Kvm closed>"
        return f"<Kvm {self.path} fd={self._fd} api={self.api_version}>"
