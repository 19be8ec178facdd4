"""Device: an in-kernel device fd from KVM_CREATE_DEVICE (kvm_device_ioctl)."""

from __future__ import annotations

import ctypes
import errno
from typing import TYPE_CHECKING

from . import abi
from ._fd import FdObject
from .errors import KvmError

if TYPE_CHECKING:
    from .vm import Vm


class DeviceAttributes(FdObject):
    """KVM_{HAS,GET,SET}_DEVICE_ATTR, which device, vCPU and VM fds all answer."""

    def _attr(self, group: int, attr: int, addr: int = 0, flags: int = 0) -> ctypes.Structure:
        return abi.kvm_device_attr(flags=flags, group=group, attr=attr, addr=addr)

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
        """KVM_GET_DEVICE_ATTR into a size-byte buffer."""
        buf = (ctypes.c_uint8 * size)()
        self.ioctl(abi.KVM_GET_DEVICE_ATTR, self._attr(group, attr, ctypes.addressof(buf)))
        return bytes(buf)

    def set_attr(self, group: int, attr: int, value: bytes | int | None = None, size: int = 8) -> None:
        """KVM_SET_DEVICE_ATTR; an int value is passed as a size-byte little-endian buffer."""
        if value is None:
            self.ioctl(abi.KVM_SET_DEVICE_ATTR, self._attr(group, attr))
            return
        data = value.to_bytes(size, "little") if isinstance(value, int) else bytes(value)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        self.ioctl(abi.KVM_SET_DEVICE_ATTR, self._attr(group, attr, ctypes.addressof(buf)))


class Device(DeviceAttributes):
    """An in-kernel device (vGIC, VFIO, ...): attributes by group and attr number."""

    def __init__(self, vm: Vm, fd: int, device_type: int) -> None:
        super().__init__(fd)
        self.vm = vm
        self.device_type = device_type
