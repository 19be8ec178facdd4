"""Device: an in-kernel device fd from KVM_CREATE_DEVICE (kvm_device_ioctl)."""

from __future__ import annotations

import ctypes
import errno
import mmap
from typing import TYPE_CHECKING

from . import abi
from ._fd import FdObject, anon_inode_name, check_same_process, check_unowned
from ._layout import check_int, fill
from .errors import KvmError

if TYPE_CHECKING:
    from .vm import Vm

__all__ = ["ATTR_BUFFER", "Device", "DeviceAttributes"]


# Bytes behind every attribute buffer: KVM writes (and reads) an attribute's own size,
# which for some (s390 CPU models) is kilobytes; a page covers every one KVM defines.
ATTR_BUFFER = mmap.PAGESIZE


class DeviceAttributes(FdObject):
    """KVM_{HAS,GET,SET}_DEVICE_ATTR, which device, vCPU and VM fds all answer."""

    def _attr(self, group: int, attr: int, addr: int = 0, flags: int = 0) -> abi.kvm_device_attr:
        return fill(abi.kvm_device_attr, flags=flags, group=group, attr=attr, addr=addr)

    def has_attr(self, group: int, attr: int) -> bool:
        """KVM_HAS_DEVICE_ATTR."""
        try:
            self.ioctl(abi.KVM_HAS_DEVICE_ATTR, self._attr(group, attr))
            return True
        except KvmError as e:
            if e.errno in (errno.ENXIO, errno.ENOTTY, errno.EINVAL):
                return False
            raise

    def get_attr(self, group: int, attr: int, size: int = 8) -> bytes:
        """KVM_GET_DEVICE_ATTR -> the attribute's first `size` bytes.

        The kernel writes as many bytes as the attribute holds, which the caller cannot
        tell it; the buffer is at least a page, more than any attribute KVM defines."""
        size = check_int(size, ctypes.c_uint32, "size")
        buf = (ctypes.c_uint8 * max(size, ATTR_BUFFER))()
        self.ioctl(abi.KVM_GET_DEVICE_ATTR, self._attr(group, attr, ctypes.addressof(buf)))
        return bytes(buf[:size])

    def set_attr(self, group: int, attr: int, value: bytes | int | None = None, size: int = 8) -> None:
        """KVM_SET_DEVICE_ATTR; an int value is passed as a size-byte little-endian buffer
        (negative values as two's complement)."""
        if value is None:
            self.ioctl(abi.KVM_SET_DEVICE_ATTR, self._attr(group, attr))
            return
        if isinstance(value, int):
            try:
                data = value.to_bytes(size, "little", signed=value < 0)
            except OverflowError:
                raise OverflowError(f"value={value:#x} does not fit in size={size} bytes") from None
        else:
            data = bytes(value)
        # The kernel reads as many bytes as the attribute holds: never less than a page here.
        buf = (ctypes.c_uint8 * max(len(data), ATTR_BUFFER)).from_buffer_copy(
            data.ljust(max(len(data), ATTR_BUFFER), b"\0"))
        self.ioctl(abi.KVM_SET_DEVICE_ATTR, self._attr(group, attr, ctypes.addressof(buf)))


class Device(DeviceAttributes):
    """An in-kernel device (vGIC, VFIO, ...): attributes by group and attr number."""

    def __init__(self, vm: Vm, fd: int, device_type: int) -> None:
        super().__init__(fd)
        self.vm = vm
        self.device_type = device_type

    @classmethod
    def from_fd(cls, vm: Vm, fd: int, device_type: int) -> Device:
        """A Device of vm for an open KVM_CREATE_DEVICE fd of that VM, made elsewhere in this
        process; closed with the VM like one from vm.create_device().

        From then on the Device owns fd and closes it: dup() it first to keep one of yours.
        If fd is not a KVM device fd (or vm is closed) it raises and fd stays yours, open.
        That the device is of device_type and belongs to vm is the caller's word: the
        kernel cannot be asked.
        """
        from .vm import Vm
        if not isinstance(vm, Vm):
            raise TypeError(f"Device.from_fd() takes the Vm the device belongs to, not "
                            f"{type(vm).__name__}")
        fd = check_int(fd, ctypes.c_int, "fd")
        name = anon_inode_name(fd)
        kind = name.removeprefix("anon_inode:kvm-")
        if kind == name or kind.startswith(("vm", "vcpu")):
            raise ValueError(f"fd {fd} is {name}, not a KVM device fd (anon_inode:kvm-<device>)")
        check_same_process(fd, "device")
        check_unowned(fd)
        vm.fd  # noqa: B018 - a closed VM refuses before fd is taken
        dev = cls(vm, fd, device_type)
        vm._adopt(dev, refused=dev._disown)   # closed with the VM; if it closed just now, the
        return dev                            # fd goes back to the caller, unclosed
