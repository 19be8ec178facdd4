"""Errors: KvmError for what an ioctl refused, and the few cases a user must act on."""

from __future__ import annotations

import errno as _errno
import os

__all__ = ["BootError", "GuestMemoryError", "KvmError", "KvmUnavailable", "KvmUnsupported",
           "PendingExitError", "RestoreError", "SnapshotError", "StaleExitError", "StaleHandleError",
           "VcpuBusyError"]


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


class BootError(ValueError):
    """A kernel, initrd or command line the boot loader cannot use, or guest memory it does
    not fit: the message names the sizes and addresses involved."""


class StaleHandleError(ValueError):
    """A handle used after what it names is gone, or with an object it does not belong to:
    a closed Kvm/Vm/Vcpu/Device, a removed memory region, a region of another VM."""


class StaleExitError(StaleHandleError):
    """An exit answered (or its answer buffer read) after its vCPU ran again or closed:
    the guest has moved on, and the answer would land in the next exit's bytes."""


class VcpuBusyError(RuntimeError):
    """run() on a vCPU that another thread is running: one vCPU runs in one thread at a time."""


class SnapshotError(ValueError):
    """A snapshot that cannot be used here: not a snapshot, cut short or altered, written
    for another arch or with other ABI layouts, or a VM whose state cannot be saved."""


class RestoreError(SnapshotError):
    """The kernel refused part of a snapshot while restoring it; the new VM was closed.
    step names the part (``vcpu 0: KVM_SET_XSAVE``); __cause__ is the kernel's error."""

    def __init__(self, step: str, cause: BaseException) -> None:
        self.step = step
        super().__init__(f"restoring {step} failed: {cause}; the VM being restored was closed")


class PendingExitError(SnapshotError):
    """save_state() completed a vCPU's pending I/O, and the guest's instruction (a string
    I/O with more to move) exited again: exit is that exit, to handle before saving."""

    def __init__(self, vcpu_id: int, exit: object) -> None:
        self.exit = exit
        super().__init__(f"vCPU {vcpu_id} exited again while its pending I/O was completed "
                         f"({exit!r}): handle that exit (this error's .exit), run() on, and "
                         f"call save_state() again")
