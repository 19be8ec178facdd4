"""Does the running kernel know each of KVM's ioctl numbers, on the fd it belongs to?

The rules, so that nothing here can harm the host:

- Every probe goes to a throwaway VM made for it (with an in-kernel irqchip, so the
  LAPIC calls are reachable), its one vCPU (immediate_exit set: KVM_RUN returns at once)
  and, where the kernel has one, a VFIO device of it; or to the /dev/kvm fd itself.
- An ioctl that passes a struct gets a pointer to a page mapped with no access: the
  kernel faults (EFAULT) on its first read or write of the argument, before acting on
  it. One that passes a value gets 0.
- Any fd a probe makes the kernel return (a VM, a vCPU, a stats fd) is closed at once;
  no other fd is touched, so runs in several threads at once do not disturb one another.

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
import gc
import mmap
import os
from collections.abc import Iterator

from .. import abi
from .._fd import _ioctl
from ..errors import KvmError
from ..system import Kvm
from .report import Report, Status

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


def _open_fds() -> dict[int, str]:
    """This process's open fds, each with what /proc names it. (Listing /proc/self/fd opens
    one more fd, and listing it by an fd of our own dup()s that one: whichever it is, it is
    closed by the time of the readlink, which leaves it out. Kept, its number would look
    open when a probe's new fd took it.)"""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
    return out


# /proc/self/fd's names of the fds KVM makes: kvm-vm, kvm-vcpu:N, kvm-vm-stats, [kvm-gmem]...
_KVM_FD_NAMES = ("anon_inode:kvm", "anon_inode:[kvm")


def _probe(fd: int, number: int, size: int, fault: int) -> int:
    """The errno the kernel answers (0 for success); an fd it returned is closed.

    An ioctl that makes an fd returns it (one taking a struct faults on the no-access page
    first), so only that fd is closed: the return value, if /proc names it a KVM fd and it
    was not that file before the ioctl. A number open before may be new all the same:
    another thread, or a collection finalizing some unreachable object, can close a file
    between the listing and the ioctl, and the kernel hands the number straight back. So
    a number is new if it was not open or /proc named it otherwise; the collector is off
    across that window, so that an old KVM fd of the same name cannot go the same way.
    Closing every fd that appeared meanwhile would close other threads' files. Between the
    ioctl and the close only C functions run, so a Ctrl-C cannot land between them and
    leave the fd open."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        before = _open_fds()
        ret = _ioctl(fd, number, fault if size else 0)
    finally:
        if collecting:
            gc.enable()
    err = ctypes.get_errno() if ret < 0 else 0
    if ret > 0:
        try:
            made = os.readlink(f"/proc/self/fd/{ret}")
        except OSError:
            made = ""
        if made.startswith(_KVM_FD_NAMES) and before.get(ret) != made:
            os.close(ret)
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
            # /dev/kvm is asked directly; the other kinds each on a VM made for that probe.
            out[name] = {"system": _probe(kvm.fd, io.number, io.size, fault)}
            for kind in FD_KINDS[1:]:
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
    ios = kvm_ioctls()
    with kvm.create_vm() as vm:
        offered = {name: _gate(kvm, vm, ios[name].capability) for name in results}
    for name, by_kind in results.items():
        status, detail = judge(ios[name], by_kind, unknown, offered[name])
        report.add(name, "ioctls", status, detail)


def _gate(kvm: Kvm, vm: object, caps: tuple[str, ...] | None) -> dict[str, int] | None:
    """{capability: its value} for the capabilities the header gates an ioctl with: asked
    on the VM (which may answer more than /dev/kvm) and on /dev/kvm, the larger kept."""
    if not caps:
        return None
    out = {}
    for cap in caps:
        number = getattr(abi, cap)
        out[cap] = max(kvm.check_extension(number), vm.check_extension(number))  # type: ignore[attr-defined]
    return out


def judge(io: abi.Ioctl, by_kind: dict[str, int | None], unknown: dict[str, int],
          gate: dict[str, int] | None) -> tuple[Status, str]:
    """pass, fail or skip for one ioctl, with the reason, from the kernel's answers, the fd
    kinds the header names (io.fd) and the capabilities it gates the ioctl with (gate)."""
    known = [k for k, err in by_kind.items() if recognised(err, unknown.get(k))]
    where = ", ".join(f"{k} fds ({describe(by_kind[k])})" for k in known)
    offered = gate is None or any(gate.values())
    gate_text = "" if gate is None else " and ".join(f"{c} is {v}" for c, v in gate.items())
    declared = io.fd or ()
    if declared and all(k in known for k in declared):
        if not offered:            # known though not offered: said, not hidden
            return "pass", f"note: known on {where}, though {gate_text}"
        return "pass", f"known on {where}, as the header says"
    if not declared:               # the header does not say: report where it is known
        if known:
            return "pass", f"known on {where} (the header names no fd kind)"
        if not offered:
            return "pass", f"not offered ({gate_text}) and known on no fd"
        if gate is not None:
            return "fail", f"{gate_text}, but no fd kind knows it"
        return "skip", "known on no fd, and the header names neither a fd kind nor a capability"
    missing = [k for k in declared if k not in known]
    if all(by_kind.get(k) is None for k in missing):
        return "skip", f"no {' or '.join(missing)} fd here to ask (the kernel made none)"
    certain = [k for k in missing if by_kind.get(k) == errno.ENOTTY]
    named = ", ".join(f"{k} fds ({describe(by_kind[k])})" for k in missing)
    if not offered:
        return "pass", f"not offered ({gate_text}), and {named} do not know it"
    if known and not certain:
        return "skip", (f"the header names {named}, where this probe cannot tell; the kernel "
                        f"knows it on {where}")
    if certain and gate is not None:
        return "fail", f"{gate_text}, but {named} do not know it"
    if certain and known:
        return "fail", f"the header names {named}, which do not know it; {where} do"
    if certain:
        return "skip", (f"{named} do not know it, and the header names no capability for it "
                        "(another arch's ioctl, or one the kernel withdrew)")
    return "skip", f"{named} answer as for an unknown number: this probe cannot tell"
