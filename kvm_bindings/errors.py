"""Errors: KvmError for what an ioctl refused, and the few cases a user must act on."""

from __future__ import annotations

import errno as _errno
import os

__all__ = ["GuestMemoryError", "KvmError", "KvmUnavailable", "KvmUnsupported", "StaleExitError",
           "StaleHandleError", "VcpuBusyError"]


class KvmError(OSError):
    """An ioctl on a KVM fd failed: names the ioctl and carries the errno."""

    def __init__(self, ioctl: str, err: int, detail: str = "") -> None:
        self.ioctl = ioctl
        msg = f"{ioctl} failed: {os.strerror(err)}"
        if detail:
            msg += f" ({detail})"
        super().__init__(err, msg)

    def __str__(self) -> str:
        return f"[Errno {self.errno}] {self.strerror}"


class KvmUnavailable(KvmError):
    """/dev/kvm cannot be opened: missing module, no permission, or not a KVM host."""

    def __init__(self, path: str, err: int, why: str = "") -> None:
        hints = {
            _errno.ENOENT: f"{path} does not exist: load the kvm module (modprobe kvm_intel or "
                           "kvm_amd) or run on a host with virtualization enabled",
            _errno.EACCES: f"no permission to open {path}: add yourself to the 'kvm' group "
                           "or adjust its mode",
            _errno.EPERM: f"not permitted to open {path}",
            _errno.ENXIO: f"{path} exists but no KVM module is bound to it",
        }
        super().__init__("open", err, f"{path}: {why}" if why else hints.get(err, path))
        self.filename = path


class KvmUnsupported(KvmError):
    """This kernel lacks a capability the call needs."""

    def __init__(self, what: str, capability: str) -> None:
        self.capability = capability
        super().__init__(what, _errno.EOPNOTSUPP,
                         f"this kernel does not report {capability}")


class GuestMemoryError(ValueError):
    """A guest-physical range that guest memory does not fully back."""


class StaleHandleError(ValueError):
    """A handle used after what it names is gone, or with an object it does not belong to:
    a closed Kvm/Vm/Vcpu/Device, a removed memory region, a region of another VM."""


class StaleExitError(StaleHandleError):
    """An exit answered (or its answer buffer read) after its vCPU ran again or closed:
    the guest has moved on, and the answer would land in the next exit's bytes."""


class VcpuBusyError(RuntimeError):
    """run() on a vCPU that another thread is running: one vCPU runs in one thread at a time."""
