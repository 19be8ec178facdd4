"""Kvm: the /dev/kvm system fd (kvm_dev_ioctl in the kernel)."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from typing import Any

from . import _requests, abi
from ._fd import CapabilityOwner
from ._layout import check_int
from .errors import KvmError, KvmUnavailable
from .vm import Vm

DEFAULT_PATH = "/dev/kvm"


class Kvm(CapabilityOwner):
    """The KVM subsystem: capabilities, CPUID and MSR lists, and VM creation.

    Opens /dev/kvm with O_RDWR | O_CLOEXEC and checks KVM_GET_API_VERSION.
    """

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
    def capabilities(self) -> dict[Any, int]:
        """Every capability the bindings know, with this kernel's value for it."""
        return {cap: self.check_extension(cap) for cap in abi.Capability}

    @property
    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to mmap on each vCPU fd (kvm_run and rings)."""
        if self._mmap_size is None:
            self._mmap_size = self.ioctl(abi.KVM_GET_VCPU_MMAP_SIZE)
        return self._mmap_size

    @property
    def recommended_vcpus(self) -> int:
        return self.check_extension(abi.Capability.NR_VCPUS) or 4

    @property
    def max_vcpus(self) -> int:
        return self.check_extension(abi.Capability.MAX_VCPUS) or self.recommended_vcpus

    @property
    def max_vcpu_id(self) -> int:
        return self.check_extension(abi.Capability.MAX_VCPU_ID) or self.max_vcpus

    # -- x86 CPUID and MSRs
    def _cpuid(self, number: int, name: str, cap: int, start: int = 64) -> Any:
        self.require(cap, name)
        n = start
        while True:
            cpuid = abi.kvm_cpuid2.alloc(n)
            try:
                self.ioctl(number, cpuid, name=name)
                return cpuid
            except KvmError as e:
                # E2BIG: the buffer was too small; the kernel does not say how big to go.
                if e.errno != errno.E2BIG or n >= 1 << 16:
                    raise
                n *= 2

    def supported_cpuid(self) -> Any:
        """KVM_GET_SUPPORTED_CPUID as a kvm_cpuid2 (entries: .flex_array())."""
        return self._cpuid(abi.KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID",
                           abi.Capability.EXT_CPUID)

    def emulated_cpuid(self) -> Any:
        """KVM_GET_EMULATED_CPUID: CPUID bits KVM can emulate even where hardware lacks them."""
        return self._cpuid(abi.KVM_GET_EMULATED_CPUID, "KVM_GET_EMULATED_CPUID",
                           abi.Capability.EXT_EMUL_CPUID)

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

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM_GET_MSRS/KVM_SET_MSRS can access on a vCPU."""
        return self._index_list(abi.KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST")

    def feature_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_FEATURE_INDEX_LIST: MSRs that describe features (KVM_CAP_GET_MSR_FEATURES)."""
        self.require(abi.Capability.GET_MSR_FEATURES, "KVM_GET_MSR_FEATURE_INDEX_LIST")
        return self._index_list(abi.KVM_GET_MSR_FEATURE_INDEX_LIST,
                                "KVM_GET_MSR_FEATURE_INDEX_LIST")

    def feature_msrs(self, indices: list[int] | None = None) -> dict[int, int]:
        """Values of feature MSRs (KVM_GET_MSRS on /dev/kvm), all of them by default."""
        if indices is None:
            indices = self.feature_msr_index_list()
        msrs = _requests.msrs(indices)
        return _requests.msr_results(msrs, self.ioctl(abi.KVM_GET_MSRS, msrs))

    # -- VMs
    def vm_types(self) -> int:
        """Bitmask of VM types KVM_CREATE_VM accepts (KVM_CAP_VM_TYPES), bit 0 if unknown."""
        return self.check_extension(abi.Capability.VM_TYPES) or 1

    def create_vm(self, vm_type: int = 0) -> Any:
        """KVM_CREATE_VM: a new VM ("kvm-vm" anonymous fd)."""
        fd = self.ioctl(abi.KVM_CREATE_VM, check_int(vm_type, ctypes.c_ulong, "vm_type"))
        return Vm(self, fd, vm_type)      # the Vm owns fd from its first line, even if it fails

    def __repr__(self) -> str:
        if getattr(self, "_closing", True) or not hasattr(self, "api_version"):
            return "<Kvm closed>"
        return f"<Kvm {self.path} fd={self._fd} api={self.api_version}>"
