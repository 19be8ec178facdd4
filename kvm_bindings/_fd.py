"""File-descriptor objects and the ioctl call every KVM object goes through."""

from __future__ import annotations

import ctypes
import errno
import os
import warnings
from typing import Any

from . import abi
from .errors import KvmError, KvmUnsupported

_libc = ctypes.CDLL(None, use_errno=True)
# ctypes releases the GIL around foreign calls: a vCPU thread blocked in KVM_RUN
# does not stop other Python threads.
_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int

_NAMES = {io.number: name for name, io in abi.IOCTLS.items()}


def ioctl_name(number: int) -> str:
    return _NAMES.get(number, hex(number))


def arg_pointer(arg: Any) -> int | None:
    """An ioctl argument as the kernel wants it: ctypes objects by address, ints as they are."""
    if arg is None:
        return None
    if isinstance(arg, int):
        return arg
    return ctypes.addressof(arg)


class FdObject:
    """Something that owns one fd: closes it once, refuses use after close, warns if leaked."""

    _fd: int = -1
    _closed: bool = True

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._closed = False

    @property
    def fd(self) -> int:
        """The file descriptor; ValueError once closed, so a recycled number is never used."""
        if self._closed:
            raise ValueError(f"I/O operation on closed {type(self).__name__}")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._closed

    def ioctl(self, number: int, arg: Any = None, *, name: str | None = None) -> int:
        """Issue one ioctl on this fd; raise KvmError naming it on failure."""
        fd = self.fd
        while True:
            ret = _ioctl(fd, number, arg_pointer(arg))
            if ret >= 0:
                return int(ret)
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise KvmError(name or ioctl_name(number), err)

    def _get(self, number: int, cls: Any, **fields: Any) -> Any:
        """A fresh cls (fields preset), filled in by the ioctl."""
        obj = cls(**fields)
        self.ioctl(number, obj)
        return obj

    def _release(self) -> None:
        """Free what the object holds besides its fd (mappings, children)."""

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._release()
        finally:
            self._closed = True
            os.close(self._fd)

    def __enter__(self) -> Any:
        self.fd  # noqa: B018 - refuse a closed object here rather than later
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._closed:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2, source=self)
            try:
                self.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"<{type(self).__name__} {state}>"


class CapabilityOwner(FdObject):
    """An fd that answers KVM_CHECK_EXTENSION (the system fd and VM fds)."""

    def check_extension(self, cap: int) -> int:
        raise NotImplementedError

    def require(self, cap: int, what: str) -> int:
        """The capability's value, or KvmUnsupported naming the capability `what` needs."""
        value = self.check_extension(cap)
        if not value:
            raise KvmUnsupported(what, f"KVM_CAP_{abi.Capability(cap).name}")
        return value
