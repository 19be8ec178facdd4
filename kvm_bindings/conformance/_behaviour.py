"""Behaviour checks: the bundled guests (kvm_bindings/guests, prebuilt) run on a fresh VM
each, and what the kernel reports must be exactly what the guest did.

Each check needs only what it names; one whose capability this kernel lacks is skipped
with that capability's name. A guest that does not get where it should within
GUARD_SECONDS is stopped (kick) and the check fails.
"""

from __future__ import annotations

import os
import platform
import struct
import threading
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, cast

from .. import abi
from ..errors import KvmUnsupported
from ..exits import Exit, HltExit, IoExit, MmioExit, ShutdownExit
from ..system import Kvm
from .report import Report

if TYPE_CHECKING:       # the guests are x86 code: the checks run only on an x86 host
    from ..x86 import X86Vcpu as Vcpu
    from ..x86 import X86Vm as Vm

GUARD_SECONDS = 10.0
LOAD, GDT, STACK = 0x1000, 0x500, 0x8000


class CheckFailed(AssertionError):
    """What the kernel did differs from what the guest did: the message says how."""


def expect(condition: bool, detail: str) -> None:
    if not condition:
        raise CheckFailed(detail)


def guest(name: str) -> bytes:
    return resources.files("kvm_bindings").joinpath(f"guests/{name}.bin").read_bytes()


def _start(vm: Vm, name: str, *, protected: bool = False) -> Vcpu:
    from .. import x86
    vm.memory.write(LOAD, guest(name))
    vcpu = vm.create_vcpu(0)
    if protected:
        x86.setup_protected_mode(vcpu, vm.memory, LOAD, gdt_addr=GDT, stack=STACK)
    else:
        x86.setup_real_mode(vcpu, LOAD, stack=STACK)
    return vcpu


def _answer(e: IoExit | MmioExit, data: bytes) -> None:
    """What the guest's IN or MMIO read receives."""
    cast(memoryview, e.data)[:] = data


def _io(e: Exit, port: int, write: bool, what: str) -> IoExit:
    expect(isinstance(e, IoExit) and e.port == port and e.is_write == write,
           f"{what}: expected {'OUT to' if write else 'IN from'} port {port:#x}, got {e!r}")
    assert isinstance(e, IoExit)
    return e


# ---- the checks: each takes a fresh VM with 64 KiB of RAM at 0 ------------------------

def pio_out_in(vm: Vm) -> str:
    vcpu = _start(vm, "port_io")
    out = _io(vcpu.run(), 0x3F8, True, "OUT")
    expect((out.size, out.count, bytes(out.data)) == (1, 1, b"H"), f"OUT carried {out!r}")
    inp = _io(vcpu.run(), 0x3F8, False, "IN")
    _answer(inp, b"\x5a")
    echo = _io(vcpu.run(), 0x3F9, True, "echo of the IN")
    expect(bytes(echo.data) == b"\x5a", f"the guest's IN received {bytes(echo.data)!r}, not b'Z'")
    return "OUT 'H', IN answered 'Z' and echoed back"


def pio_string(vm: Vm) -> str:
    vcpu = _start(vm, "port_io")
    for _ in range(3):
        e = vcpu.run()
        if isinstance(e, IoExit) and not e.is_write:
            _answer(e, b"\0")
    text = b""
    while not isinstance(e := vcpu.run(), HltExit):
        io = _io(e, 0x3F8, True, "rep outsb")
        expect(len(io.data) == io.count * io.size, f"{io!r}: data is not count*size bytes")
        text += bytes(io.data)
    expect(text == b"hello, kvm", f"rep outsb delivered {text!r}")
    return "rep outsb delivered every element"


def mmio(vm: Vm) -> str:
    vcpu = _start(vm, "mmio")
    w = vcpu.run()
    expect(isinstance(w, MmioExit) and w.is_write and w.phys_addr == 0xD0010
           and bytes(w.data) == (0xCAFEF00D).to_bytes(4, "little"), f"MMIO write: {w!r}")
    r = vcpu.run()
    expect(isinstance(r, MmioExit) and not r.is_write and r.phys_addr == 0xD0020
           and len(r.data) == 4, f"MMIO read: {r!r}")
    assert isinstance(r, MmioExit)
    _answer(r, (0x12345678).to_bytes(4, "little"))
    echo = _io(vcpu.run(), 0x3F9, True, "echo of the MMIO read")
    expect(bytes(echo.data) == (0x12345678).to_bytes(4, "little"),
           f"the guest read {bytes(echo.data).hex()}, not the answer 78563412")
    return "4-byte MMIO write and read, the read answered"


def hlt(vm: Vm) -> str:
    e = _start(vm, "hlt").run()
    expect(isinstance(e, HltExit), f"expected a HLT exit, got {e!r}")
    return "HLT exits without an in-kernel irqchip"


def shutdown(vm: Vm) -> str:
    e = _start(vm, "triple_fault", protected=True).run()
    expect(isinstance(e, ShutdownExit), f"a triple fault gave {e!r}, not a shutdown")
    return "a triple fault is KVM_EXIT_SHUTDOWN"


def dirty_log(vm: Vm) -> str:
    logged, pages, written = 0x100000, 64, [0, 1, 5, 31, 32, 63]
    region = vm.add_memory(logged, pages * 4096, log_dirty=True)
    vcpu = _start(vm, "dirty_pages", protected=True)
    addrs = [logged + p * 4096 + 8 * p for p in written]
    vm.memory.write(0x2000, struct.pack(f"<I{len(addrs)}I", len(addrs), *addrs))
    _io(vcpu.run(), 0x10, True, "the guest's report")
    dirty = [(gpa - logged) // 4096 for gpa in vm.get_dirty_log(region)]
    expect(dirty == written, f"dirty pages {dirty}, but the guest wrote {written}")
    return f"exactly the {len(written)} pages written"


def ioeventfd(vm: Vm) -> str:
    vm.require(abi.Capability.IOEVENTFD, "ioeventfd")
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vm.add_ioeventfd(efd, 0x500, 1, pio=True)
        vcpu = _start(vm, "ioeventfd")
        e = vcpu.run()            # five port writes: no exits, then an unmatched MMIO write
        expect(isinstance(e, MmioExit), f"expected the MMIO write after the port writes, got {e!r}")
        count = os.eventfd_read(efd)
        expect(count == 5, f"the eventfd counted {count} of the guest's 5 port writes")
    finally:
        os.close(efd)
    return "5 port writes signalled the eventfd, none exited"


def irqfd(vm: Vm) -> str:
    vm.require(abi.Capability.IRQCHIP, "the in-kernel irqchip")
    vm.require(abi.Capability.IRQFD, "irqfd")
    vm.create_irqchip()
    vcpu = _start(vm, "irq")
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vm.add_irqfd(efd, 5)
        _io(vcpu.run(), 0x3F8, True, "the guest's ready")
        os.eventfd_write(efd, 1)
        handled = _io(vcpu.run(), 0x3F9, True, "the interrupt handler's report")
        expect(bytes(handled.data) == b"\x25", f"the handler ran for vector {bytes(handled.data)!r}")
        vm.remove_irqfd(efd, 5)
    finally:
        os.close(efd)
    return "an irqfd signal reached the guest's IRQ 5 handler through the in-kernel PIC"


def msr_exits(vm: Vm) -> str:
    vm.require(abi.Capability.X86_USER_SPACE_MSR, "MSR exits")
    vm.enable_cap(abi.Capability.X86_USER_SPACE_MSR, abi.KVM_MSR_EXIT_REASON_UNKNOWN)
    vcpu = _start(vm, "msr", protected=True)
    w = vcpu.run()
    expect(w.reason == abi.ExitReason.X86_WRMSR and getattr(w, "index", None) == 0xDEAD
           and getattr(w, "data", None) == 0x12345678_0BADC0DE, f"WRMSR: {w!r}")
    w.reply()                                            # type: ignore[attr-defined]
    r = vcpu.run()
    expect(r.reason == abi.ExitReason.X86_RDMSR and getattr(r, "index", None) == 0xDEAD,
           f"RDMSR: {r!r}")
    r.reply(0xAABBCCDD_11223344)                         # type: ignore[attr-defined]
    echo = _io(vcpu.run(), 0x3F9, True, "echo of the RDMSR")
    expect(bytes(echo.data) == (0x11223344).to_bytes(4, "little"),
           f"the guest's RDMSR got {bytes(echo.data).hex()}")
    return "WRMSR and RDMSR of an unknown MSR exit to userspace and are answered"


def msr_filter(vm: Vm) -> str:
    vm.require(abi.Capability.X86_MSR_FILTER, "MSR filters")
    vm.enable_cap(abi.Capability.X86_USER_SPACE_MSR, abi.KVM_MSR_EXIT_REASON_FILTER)
    vm.set_msr_filter([(abi.KVM_MSR_FILTER_READ, 0x10, 8, b"\x00")])
    vcpu = _start(vm, "msr_filter", protected=True)
    r = vcpu.run()
    expect(r.reason == abi.ExitReason.X86_RDMSR and getattr(r, "index", None) == 0x10,
           f"a filtered RDMSR of the TSC gave {r!r}")
    r.reply(0x77)                                        # type: ignore[attr-defined]
    echo = _io(vcpu.run(), 0x3F9, True, "echo of the RDMSR")
    expect(bytes(echo.data) == b"\x77\0\0\0", f"the guest read {bytes(echo.data).hex()}")
    return "a filtered RDMSR of IA32_TSC came to userspace"


def single_step(vm: Vm) -> str:
    vm.require(abi.Capability.SET_GUEST_DEBUG, "single-stepping")
    vcpu = _start(vm, "single_step")
    vcpu.set_single_step(True)
    pcs = []
    for _ in range(4):
        e = vcpu.run()
        expect(e.reason == abi.ExitReason.DEBUG, f"a step gave {e!r}")
        pcs.append(e.arch.pc)                            # type: ignore[attr-defined]
    expect(pcs == [0x1001, 0x1002, 0x1003, 0x1004], f"steps landed at {[hex(p) for p in pcs]}")
    vcpu.set_single_step(False)
    e = vcpu.run()
    expect(isinstance(e, HltExit), f"after stepping, {e!r}")
    return "one debug exit per instruction, at each next instruction"


def immediate_exit(vm: Vm) -> str:
    vm.require(abi.Capability.IMMEDIATE_EXIT, "immediate_exit")
    vcpu = _start(vm, "hlt")
    vcpu.immediate_exit = True
    e = vcpu.run()
    expect(e.reason == abi.ExitReason.INTR, f"with immediate_exit set, KVM_RUN gave {e!r}")
    expect(vcpu.get_regs().rip == LOAD, "the guest ran although immediate_exit was set")
    vcpu.immediate_exit = False
    expect(isinstance(vcpu.run(), HltExit), "the guest did not run once immediate_exit was cleared")
    return "KVM_RUN returned EINTR without entering the guest"


CHECKS: dict[str, Callable[[Vm], str]] = {
    "pio_out_in": pio_out_in, "pio_string": pio_string, "mmio": mmio, "hlt": hlt,
    "shutdown": shutdown, "dirty_log": dirty_log, "ioeventfd": ioeventfd, "irqfd": irqfd,
    "msr_exits": msr_exits, "msr_filter": msr_filter, "single_step": single_step,
    "immediate_exit": immediate_exit,
}


def run_checks(kvm: Kvm, report: Report, checks: dict[str, Callable[[Vm], str]] = CHECKS) -> None:
    if platform.machine() != "x86_64":
        for name in checks:
            report.add(name, "behaviour", "skip", "the bundled guests are x86 code")
        return
    for name, check in checks.items():
        try:
            with cast("Vm", kvm.create_vm()) as vm:
                vm.set_tss_addr(0xFFFBD000)
                vm.add_memory(0, 0x10000)
                guard = threading.Timer(GUARD_SECONDS, lambda vm=vm: [v.kick() for v in vm.vcpus])
                guard.start()
                try:
                    detail = check(vm)
                finally:      # joined: no kick may land on the next check's VM, no thread outlive run()
                    guard.cancel()
                    guard.join()
        except KvmUnsupported as e:
            report.add(name, "behaviour", "skip", f"this kernel lacks {e.capability}")
        except CheckFailed as e:
            report.add(name, "behaviour", "fail", str(e))
        except Exception as e:   # anything else the kernel did is a failure too, shown whole
            report.add(name, "behaviour", "fail", f"{type(e).__name__}: {e}")
        else:
            report.add(name, "behaviour", "pass", detail)
