"""Does the running kernel know each of KVM's ioctl numbers, on the fd it belongs to?

The rules, so that nothing here can harm the host:

- Every probe goes to a throwaway VM made for it (with an in-kernel irqchip, so the
  LAPIC calls are reachable), its one vCPU (immediate_exit set: KVM_RUN returns at once)
  and, where the kernel has one, a VFIO device of it; or to the /dev/kvm fd itself.
- An ioctl that passes a struct gets a pointer to a page mapped with no access: the
  kernel faults (EFAULT) on its first read or write of the argument, before acting on
  it. One that passes a value gets 0.
- Any fd a probe makes the kernel return (a VM, a vCPU, a stats fd) is closed at once.

How an answer is read: the kernel first answers, on each fd kind, a number of KVM's type
that no KVM ioctl uses (the "unknown" answer: ENOTTY on VM and device fds, EINVAL on
/dev/kvm and vCPU fds here). A real ioctl answered with ENOTTY, or with that fd kind's
unknown answer, is one the kernel does not know there; any other answer (success,
EFAULT, EEXIST...) is one it knows. Where the unknown answer is EINVAL, a known ioctl that
refuses its argument with EINVAL before reading it looks unknown: the probe cannot tell.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
from collections.abc import Iterator

from .. import abi
from .._fd import _ioctl
from ..errors import KvmError
from ..system import Kvm
from .report import Report

FD_KINDS = ("system", "vm", "vcpu", "device")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def kvm_ioctls() -> dict[str, abi.Ioctl]:
    """The bindings' ioctls of KVM's own type (KVMIO): the boot headers bring others."""
    return {name: io for name, io in abi.IOCTLS.items()
            if (io.number >> abi._IOC_TYPESHIFT) & abi._IOC_TYPEMASK == abi.KVMIO}


def unused_number() -> int:
    """A number of KVM's type with no direction and no size that no KVM ioctl here uses."""
    used = {(io.number >> abi._IOC_NRSHIFT) & abi._IOC_NRMASK for io in kvm_ioctls().values()}
    nr = max(n for n in range(abi._IOC_NRMASK + 1) if n not in used)
    return (abi._IOC_NONE << abi._IOC_DIRSHIFT) | (abi.KVMIO << abi._IOC_TYPESHIFT) | nr


@contextlib.contextmanager
def _no_access_page() -> Iterator[int]:
    addr = _libc.mmap(None, mmap.PAGESIZE, mmap.PROT_NONE if hasattr(mmap, "PROT_NONE") else 0,
                      mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap of a no-access page failed")
    try:
        yield int(addr)
    finally:
        _libc.munmap(addr, mmap.PAGESIZE)


def _open_fds() -> set[int]:
    """This process's open fds, less the one this listing uses."""
    listing = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return {int(f) for f in os.listdir(listing)} - {listing}
    finally:
        os.close(listing)


def _probe(fd: int, number: int, size: int, fault: int) -> int:
    """The errno the kernel answers (0 for success); fds it returned are closed."""
    before = _open_fds()
    ret = _ioctl(fd, number, fault if size else 0)
    err = ctypes.get_errno() if ret < 0 else 0
    for new in _open_fds() - before:
        with contextlib.suppress(OSError):
            os.close(new)
    return err


@contextlib.contextmanager
def _throwaway(kvm: Kvm) -> Iterator[dict[str, int | None]]:
    """{fd kind: fd}: the system fd, and a new VM, vCPU and (if possible) device."""
    with kvm.create_vm() as vm:
        if vm.check_extension(abi.Capability.IRQCHIP):
            vm.create_irqchip()                           # type: ignore[attr-defined]
        vcpu = vm.create_vcpu(0)
        vcpu.immediate_exit = True
        device = None
        with contextlib.suppress(KvmError):
            if vm.has_device_type(abi.KVM_DEV_TYPE_VFIO):
                device = vm.create_device(abi.KVM_DEV_TYPE_VFIO).fd
        yield {"system": kvm.fd, "vm": vm.fd, "vcpu": vcpu.fd, "device": device}


def answers(kvm: Kvm) -> tuple[dict[str, int], dict[str, dict[str, int | None]]]:
    """(the unknown answer per fd kind, {ioctl: {fd kind: its answer}}); None where this
    kernel has no fd of that kind to ask."""
    unknown: dict[str, int] = {}
    out: dict[str, dict[str, int | None]] = {}
    with _no_access_page() as fault:
        with _throwaway(kvm) as fds:
            for kind, fd in fds.items():
                if fd is not None:
                    unknown[kind] = _probe(fd, unused_number(), 0, fault)
        for name, io in kvm_ioctls().items():
            out[name] = {}
            for kind in FD_KINDS:
                with _throwaway(kvm) as fds:
                    fd = fds[kind]
                    out[name][kind] = None if fd is None else _probe(fd, io.number, io.size, fault)
    return unknown, out


def recognised(err: int | None, unknown: int | None) -> bool:
    """ENOTTY is the kernel's word for "no such ioctl" everywhere; the fd kind's own answer
    to an unused number means the same there."""
    return err is not None and err not in (errno.ENOTTY, unknown)


def describe(err: int | None) -> str:
    if err is None:
        return "no such fd here"
    return "succeeded" if err == 0 else errno.errorcode.get(err, str(err))


def run_checks(kvm: Kvm, report: Report) -> None:
    unknown, results = answers(kvm)
    for kind, err in unknown.items():
        report.add(f"unknown number on {kind} fds", "ioctls", "pass",
                   f"{describe(err)}: how this kernel answers a number it does not know")
    for name, by_kind in results.items():
        known = [k for k, err in by_kind.items() if recognised(err, unknown.get(k))]
        report.add(name, "ioctls", "pass" if known else "skip",
                   "recognised on " + ", ".join(f"{k} fds ({describe(by_kind[k])})" for k in known)
                   if known else "answered as an unknown number on every fd kind")
