"""Kvm: the /dev/kvm system fd (kvm_dev_ioctl in the kernel)."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar, TypeVar

from . import abi
from ._fd import CapabilityOwner, _ioctl, anon_inode_name, check_unowned
from ._layout import check_bool, check_int
from .errors import KvmError, KvmUnavailable
from .vm import Vm, _no_snapshots

if TYPE_CHECKING:
    from .backing import Backing
    from .snapshot import VmState

__all__ = ["DEFAULT_PATH", "Kvm"]

DEFAULT_PATH = "/dev/kvm"

_K = TypeVar("_K", bound="Kvm")


class Kvm(CapabilityOwner):
    """The KVM subsystem: capabilities, CPUID and MSR lists, and VM creation.

    Opens /dev/kvm with O_RDWR | O_CLOEXEC and checks KVM_GET_API_VERSION. Kvm.from_fd()
    takes an fd opened elsewhere (a privileged helper, a parent process).
    """

    #: What create_vm() makes: an arch's Kvm names its own Vm class.
    _vm_class: ClassVar[type[Vm]] = Vm

    def __init__(self, path: str = DEFAULT_PATH, *, cloexec: bool = True) -> None:
        """Open path. cloexec=False leaves the fd open across exec() (O_CLOEXEC off), for a
        launcher that execs the program that uses it; that program takes it with from_fd()."""
        check_bool(cloexec, "cloexec")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise KvmUnavailable(path, e.errno or errno.ENODEV) from None
        try:
            api_version = _check_kvm_fd(fd, path)
            if not cloexec:
                os.set_inheritable(fd, True)     # Python opens every fd with O_CLOEXEC
        except BaseException:
            os.close(fd)
            raise
        self._own_fd(fd, path, api_version)

    @classmethod
    def from_fd(cls: type[_K], fd: int) -> _K:
        """A Kvm for an open /dev/kvm fd, e.g. one received over a unix socket (SCM_RIGHTS).

        From then on the Kvm owns fd and closes it: dup() it first to keep one of yours.
        If fd is not /dev/kvm (KVM_GET_API_VERSION does not answer) it raises KvmUnavailable
        and fd stays yours, open. Its flags stay as they are: socket.recv_fds() does not set
        O_CLOEXEC (os.set_inheritable(fd, False) does).
        """
        fd = check_int(fd, ctypes.c_int, "fd")
        path = anon_inode_name(fd)
        api_version = _check_kvm_fd(fd, f"fd {fd} ({path})")
        check_unowned(fd)
        kvm = cls.__new__(cls)
        kvm._own_fd(fd, path, api_version)
        return kvm

    def _own_fd(self, fd: int, path: str, api_version: int) -> None:
        """Take a checked fd; nothing here can fail, so an fd is either refused or owned."""
        super().__init__(fd)
        self.path = path
        self.api_version = api_version
        self._caps: dict[int, int] = {}
        self._mmap_size: int | None = None

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

    def max_memory_slots(self) -> int:
        """KVM_CAP_NR_MEMSLOTS: memory slots per address space of a VM (32 if unknown)."""
        return self.check_extension(abi.Capability.NR_MEMSLOTS) or 32

    # -- VMs
    def vm_types(self) -> int:
        """Bitmask of VM types KVM_CREATE_VM accepts (KVM_CAP_VM_TYPES), bit 0 if unknown."""
        return self.check_extension(abi.Capability.VM_TYPES) or 1

    def create_vm(self, vm_type: int = 0) -> Vm:
        """KVM_CREATE_VM: a new VM ("kvm-vm" anonymous fd) of this arch's Vm class."""
        fd = self.ioctl(abi.KVM_CREATE_VM, check_int(vm_type, ctypes.c_ulong, "vm_type"))
        return self._vm_class(self, fd, vm_type)   # it owns fd from its first line, even if it fails

    def restore_vm(self, state: VmState, *, memory: Mapping[int, Backing] | None = None,
                   check_cpu: bool = True, advance_clock: bool = False) -> Vm:
        """A new VM made from a snapshot: x86_64 only in this version (see Vm.save_state)."""
        raise _no_snapshots(self._vm_class)

    def __repr__(self) -> str:
        if getattr(self, "_closing", True) or not hasattr(self, "api_version"):
            return "<Kvm closed>"
        return f"<Kvm {self.path} fd={self._fd} api={self.api_version}>"


def _check_kvm_fd(fd: int, what: str) -> int:
    """fd's KVM API version, or KvmUnavailable if fd is not a KVM system fd. Takes nothing:
    the caller still owns fd either way."""
    if not stat.S_ISCHR(os.fstat(fd).st_mode):
        raise KvmUnavailable(what, errno.ENODEV, "it is not a character device")
    version = _ioctl(fd, abi.KVM_GET_API_VERSION, None)
    if version < 0:
        err = ctypes.get_errno()
        # A device that does not know KVM's ioctls (/dev/null, a tty...) says ENOTTY or
        # EINVAL: the path is wrong, which is a missing KVM, not a failed ioctl.
        if err not in (errno.ENOTTY, errno.EINVAL):
            raise KvmError("KVM_GET_API_VERSION", err)
        raise KvmUnavailable(what, errno.ENODEV,
                             "it does not answer KVM_GET_API_VERSION: not a KVM device")
    if version != abi.KVM_API_VERSION:
        raise KvmError("KVM_GET_API_VERSION", errno.EPROTO,
                       f"kernel speaks KVM API {version}, these bindings {abi.KVM_API_VERSION}")
    return int(version)
