"""A small VMM that boots a Linux kernel (or memtest86+) and shows its serial console.

Run it:
    python examples/boot_linux.py KERNEL [--cmdline TEXT] [--initrd FILE] [--bits 64|32]
                                         [--memory MIB] [--until TEXT] [--timeout SECONDS]

KERNEL is a bzImage or an uncompressed ELF vmlinux (examples/extract_vmlinux.py makes one
from a bzImage). The guest's serial output goes to stdout; what the VMM did, to stderr.
With --until, the VMM stops (exit status 0) once the console has printed TEXT; with
--timeout, it stops (status 1) after that many seconds. Status 2: the guest stopped
(shut down, or KVM could not run an instruction: the report says which one).

The machine: RAM at 0, the in-kernel interrupt controllers and PIT, one 16550 UART at
0x3f8 (output only, no interrupts), a CMOS clock at 0x70, and nothing else: other ports
and unbacked addresses read as all-ones, as on a PC with nothing there.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from kvm_bindings import InternalErrorExit, InterruptedExit, IoExit, Kvm, MmioExit, x86

# [uart]
COM1 = 0x3F8
THR, IER, IIR, LCR, MCR, LSR, MSR, SCR = range(8)   # register offsets from the base port
LSR_THR_EMPTY, LSR_IDLE = 0x20, 0x40
LCR_DLAB, MCR_LOOP = 0x80, 0x10


class Uart16550:
    """Enough of a 16550 for a kernel's console: it writes, polls LSR, and probes the chip."""

    def __init__(self, out) -> None:
        self.out = out
        self.regs = bytearray(8)       # what the guest last wrote to each register
        self.divisor = bytearray(2)    # the baud divisor, behind DLAB

    def read(self, offset: int) -> int:
        if offset in (THR, IER) and self.regs[LCR] & LCR_DLAB:
            return self.divisor[offset]
        if offset == LSR:
            return LSR_THR_EMPTY | LSR_IDLE      # always ready to send; nothing received
        if offset == IIR:
            return 0x01                          # no interrupt pending
        if offset == MSR and self.regs[MCR] & MCR_LOOP:
            # Loopback, which drivers use to detect the chip: the modem outputs come back
            # as inputs (DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD).
            mcr = self.regs[MCR]
            return ((mcr & 1) << 5) | ((mcr & 2) << 3) | ((mcr & 4) << 4) | ((mcr & 8) << 4)
        if offset == THR:
            return 0                             # no input
        return self.regs[offset]

    def write(self, offset: int, value: int) -> None:
        if offset in (THR, IER) and self.regs[LCR] & LCR_DLAB:
            self.divisor[offset] = value
        elif offset == THR:
            if not self.regs[MCR] & MCR_LOOP:
                self.out(bytes([value]))
        else:
            self.regs[offset] = value
# [/uart]


# [cmos]
CMOS_INDEX, CMOS_DATA = 0x70, 0x71


class Cmos:
    """The MC146818 clock the kernel reads the date from: BCD, 24-hour, the host's UTC time.
    (Its day of the week counts from Sunday = 1; Python's from Monday = 0.)"""

    def __init__(self) -> None:
        self.index = 0

    def read(self) -> int:
        t = time.gmtime()
        fields = {0x00: t.tm_sec, 0x02: t.tm_min, 0x04: t.tm_hour, 0x06: (t.tm_wday + 1) % 7 + 1,
                  0x07: t.tm_mday, 0x08: t.tm_mon, 0x09: t.tm_year % 100, 0x32: t.tm_year // 100}
        if self.index in fields:
            value = fields[self.index]
            return (value // 10) << 4 | value % 10
        # Status A: no update in progress; B: 24-hour BCD; D: the battery is good.
        return {0x0A: 0x26, 0x0B: 0x02, 0x0D: 0x80}.get(self.index, 0)

    def write_index(self, value: int) -> None:
        self.index = value & 0x7F                # bit 7 masks NMIs: nothing to do here
# [/cmos]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    console = bytearray()

    def show(data: bytes) -> None:
        console.extend(data)
        sys.stdout.buffer.write(data)
        sys.stdout.flush()

    # [machine]
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.set_tss_addr(0xFFFBD000)          # three pages KVM needs on Intel, out of the way
        vm.create_irqchip()                  # PIC, IOAPIC and LAPIC in the kernel
        vm.create_pit2()                     # the timer the kernel calibrates against
        vm.add_memory(0, args.memory << 20)
        vcpu = vm.create_vcpu(0)
        x86.set_supported_cpuid(vcpu)
        boot = x86.load_linux(vm, vcpu, args.kernel, cmdline=args.cmdline, initrd=args.initrd,
                              bits=args.bits)
        # [/machine]
        print(f"loaded {boot.format} (protocol {boot.protocol >> 8}.{boot.protocol & 0xFF:02d}) "
              f"at [{boot.kernel.addr:#x}, {boot.kernel.end:#x}), {boot.bits}-bit entry "
              f"{boot.entry:#x}", file=sys.stderr)
        if boot.initrd:
            print(f"initrd at [{boot.initrd.addr:#x}, {boot.initrd.end:#x})", file=sys.stderr)
        timer = threading.Timer(args.timeout, vcpu.kick) if args.timeout else None
        if timer:
            timer.start()
        try:
            status, why, exits = _run(vcpu, Uart16550(show), Cmos(), console, args.until)
        finally:
            if timer:
                timer.cancel()
        rip = vcpu.get_regs().rip
    print(f"\nstopped: {why}; rip {rip:#x}, {exits} exits", file=sys.stderr)
    return status


# [loop]
def _run(vcpu, uart: Uart16550, cmos: Cmos, console: bytearray,
         until: str | None) -> tuple[int, str, int]:
    """Run until the console shows `until`, the guest stops, or a kick (the timeout)."""
    wanted = until.encode() if until else None
    exits = 0
    while True:
        exit = vcpu.run()
        exits += 1
        if isinstance(exit, IoExit):
            for i in range(exit.count):
                item = exit.data[i * exit.size:(i + 1) * exit.size]
                if exit.is_write:
                    _port_write(exit.port, item[0], uart, cmos)
                else:
                    item[:] = bytes([_port_read(exit.port, uart, cmos)]) + b"\xff" * (exit.size - 1)
            if wanted and wanted in console[:console.rfind(b"\n") + 1]:    # a whole line
                return 0, f"the console printed {until!r}", exits
        elif isinstance(exit, MmioExit):
            if not exit.is_write:
                exit.data[:] = b"\xff" * len(exit.data)     # nothing is there
        elif isinstance(exit, InterruptedExit):
            return 1, "timed out", exits
        elif isinstance(exit, InternalErrorExit) and exit.instruction is not None:
            return 2, (f"KVM could not emulate the instruction "
                       f"{exit.instruction.hex(' ')} (an emulation failure)"), exits
        else:
            return 2, f"the guest stopped: {exit!r}", exits


def _port_read(port: int, uart: Uart16550, cmos: Cmos) -> int:
    if COM1 <= port < COM1 + 8:
        return uart.read(port - COM1)
    if port == CMOS_DATA:
        return cmos.read()
    return 0xFF                          # no device: the bus floats high


def _port_write(port: int, value: int, uart: Uart16550, cmos: Cmos) -> None:
    if COM1 <= port < COM1 + 8:
        uart.write(port - COM1, value)
    elif port == CMOS_INDEX:
        cmos.write_index(value)
# [/loop]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kernel", help="a bzImage or an ELF vmlinux")
    p.add_argument("--cmdline", default="console=ttyS0 earlyprintk=serial,ttyS0")
    p.add_argument("--initrd")
    p.add_argument("--bits", type=int, choices=(64, 32), default=64,
                   help="enter at the 64-bit entry point (default) or the 32-bit one")
    p.add_argument("--memory", type=int, default=512, help="guest RAM in MiB (default 512)")
    p.add_argument("--until", help="stop once the console has printed this text")
    p.add_argument("--timeout", type=float, help="stop after this many seconds")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
