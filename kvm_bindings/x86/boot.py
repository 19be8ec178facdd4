"""Booting Linux: load a bzImage or ELF vmlinux per the x86 boot protocol and enter it.

load_linux() does what a boot loader does for a 64-bit (or 32-bit) entry: place the
kernel, command line and initrd in guest RAM, fill struct boot_params (abi.boot_params,
generated from asm/bootparam.h) with an e820 map built from the VM's memory slots,
and set up a flat GDT, identity page tables and the registers the protocol names.
It writes no ACPI, MP or SMBIOS tables and no real-mode setup: the kernel finds one
CPU and no firmware tables (say acpi=off, or provide them yourself).

Low memory it uses (all of it must be RAM): the GDT at 0x500, boot_params at 0x7000,
a boot stack below 0x9000, page tables from 0x9000 to 0xf000 (4 GiB identity-mapped),
the command line at 0x20000 (below 1 MiB). The kernel goes between 1 MiB and 4 GiB.
"""

from __future__ import annotations

import ctypes
import enum
import os
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Literal, NamedTuple, Union

from ..abi import x86_64 as abi
from ..errors import BootError, StaleHandleError
from ._kernel_image import BOOT_FLAG, ENTRY_64_OFFSET, HDR_OFFSET, HDRS, parse_kernel
from ._kernel_image import BzImage as _BzImage
from ._kernel_image import ElfImage as _ElfImage
from .modes import (
    _CODE32,
    _CODE64,
    _DATA,
    PAGE,
    _enter_long_mode,
    _enter_protected_mode,
    page_table_size,
)
from .vcpu import X86Vcpu
from .vm import X86Vm

__all__ = ["LEGACY_HOLE", "E820Entry", "E820Type", "LinuxBoot", "Placed", "load_linux"]

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]


class E820Type(enum.IntEnum):
    """e820 address-range types (ACPI, "Address Range Types"); the uapi headers carry the
    entry's layout (boot_e820_entry) but not these values."""
    RAM = 1
    RESERVED = 2
    ACPI = 3
    NVS = 4
    UNUSABLE = 5
    PMEM = 7


class E820Entry(NamedTuple):
    addr: int
    size: int
    type: E820Type

    def __repr__(self) -> str:
        return f"E820Entry(addr={self.addr:#x}, size={self.size:#x}, type={self.type.name})"


class Placed(NamedTuple):
    """A guest-physical range the loader filled."""
    addr: int
    size: int

    @property
    def end(self) -> int:
        return self.addr + self.size

    def __repr__(self) -> str:
        return f"Placed(addr={self.addr:#x}, size={self.size:#x})"


@dataclass(frozen=True)
class LinuxBoot:
    """What load_linux() placed where, and how the vCPU enters the kernel."""

    format: Literal["bzImage", "ELF"]
    protocol: int               # the setup header's version (0x20f is 2.15); an ELF gets ours
    bits: int                   # 64 or 32: the entry point and CPU mode used
    entry: int
    kernel: Placed              # from the load address over init_size (bzImage) or all segments
    boot_params: Placed
    cmdline: Placed             # with its terminating NUL
    initrd: Placed | None
    gdt: Placed
    page_tables: Placed | None  # None for a 32-bit entry (paging off)
    e820: tuple[E820Entry, ...]

    def __repr__(self) -> str:       # addresses in hex, as a VMM author reads them
        shown = [f"{f.name}={value:#x}" if isinstance(value := getattr(self, f.name), int)
                 and f.name != "bits" else f"{f.name}={value!r}" for f in fields(self)]
        return f"LinuxBoot({', '.join(shown)})"


# The PC's legacy video memory and BIOS window: reserved, as on real hardware, by default.
LEGACY_HOLE = (0xA0000, 0x60000)
# The boot protocol's boot GDT: __BOOT_CS = 0x10 and __BOOT_DS = 0x18, flat.
_BOOT_CS, _BOOT_DS = 0x10, 0x18
_GDT_64, _GDT_32 = (0, 0, _CODE64, _DATA), (0, 0, _CODE32, _DATA)
# Where the loader's own pieces go: low memory, clear of the real-mode IVT and BIOS data
# area (below 0x500) and of the legacy hole; the kernel and initrd go at 1 MiB and above.
_IDENTITY_GIB = 4
_GDT = Placed(0x500, 8 * len(_GDT_64))
_BOOT_PARAMS = Placed(0x7000, PAGE)                          # the "zero page"
_STACK_TOP = 0x8FF0                                          # in the page below 0x9000
_PAGE_TABLES = Placed(0x9000, page_table_size(_IDENTITY_GIB))
_CMDLINE = 0x20000
# The kernel runs from the identity map (64-bit entry) or with 32-bit addresses: below 4 GiB.
_KERNEL_TOP = _IDENTITY_GIB << 30
_HIGH = 0x100000                 # the kernel goes at 1 MiB or above
_LOADER_ID = 0xFF                # type_of_loader: "undefined" (no assigned loader id)
_PREF_ADDRESS_PROTOCOL = 0x020A  # pref_address and init_size: boot protocol 2.10
_ELF_PROTOCOL = 0x020F           # what an ELF vmlinux is told: the protocol we fill fields of
_ELF_CMDLINE_SIZE = 2047         # x86 COMMAND_LINE_SIZE less the NUL
_ELF_INITRD_MAX = 0x7FFFFFFF     # the limit 64-bit kernels declare in their own headers
_LONG_MODE_LEAF, _LONG_MODE_BIT = 0x80000001, 1 << 29   # CPUID: EDX.LM


def load_linux(vm: X86Vm, vcpu: X86Vcpu, kernel: Source, cmdline: str | bytes = "",
               initrd: Source | None = None, *, bits: int = 64,
               reserved: Iterable[tuple[int, int]] = (LEGACY_HOLE,)) -> LinuxBoot:
    """Load a kernel (bzImage or ELF vmlinux) and an optional initrd; set the vCPU to enter it.

    Call after vm.add_memory() for RAM and, for bits=64, x86.set_supported_cpuid(vcpu):
    KVM refuses long mode to a vCPU whose CPUID lacks it. kernel and initrd are paths or
    bytes. reserved lists (address, size) ranges to mark reserved in the e820 map (and
    keep out of RAM); read-only slots are reserved too. Everything is checked before
    guest memory or the vCPU is touched: BootError names what does not fit and its size.
    """
    if not isinstance(vm, X86Vm) or not isinstance(vcpu, X86Vcpu):
        raise TypeError(f"load_linux() takes an x86 VM and vCPU, not {type(vm).__name__} and "
                        f"{type(vcpu).__name__}")
    for handle in (vm, vcpu):
        if handle.closed:
            raise StaleHandleError(f"load_linux(): {handle!r} is closed")
    if vcpu.vm is not vm:
        raise StaleHandleError("load_linux(): the vCPU belongs to another VM")
    if not isinstance(bits, int) or bits not in (32, 64):
        raise ValueError(f"bits must be 64 or 32, not {bits!r}")
    image = parse_kernel(_read(kernel, "kernel"), "the kernel")
    line = _command_line(cmdline, image)
    ramdisk = _read(initrd, "initrd") if initrd is not None else None
    e820 = _e820(vm, reserved)
    ram = [(e.addr, e.addr + e.size) for e in e820 if e.type == E820Type.RAM]
    page_tables = _PAGE_TABLES if bits == 64 else None
    low = [_GDT, _BOOT_PARAMS, Placed(_STACK_TOP & ~(PAGE - 1), PAGE), Placed(_CMDLINE, len(line)),
           *([page_tables] if page_tables else [])]
    for part in low:
        _require_ram(ram, part, "the loader's low-memory tables")
    if bits == 64:
        _require_long_mode(vcpu)
    kernel_range, entry = _place_kernel(image, ram, bits)
    initrd_range = _place_initrd(ramdisk, image, ram, kernel_range) if ramdisk is not None else None

    params = _boot_params(image, kernel_range, line, initrd_range, e820)
    memory = vm.memory
    memory.write(_BOOT_PARAMS.addr, bytes(params))
    memory.write(_CMDLINE, line)
    if isinstance(image, _BzImage):
        memory.write(kernel_range.addr, image.payload)
    else:
        for seg in image.segments:
            memory.write(seg.paddr, seg.data)
            memory.write(seg.paddr + len(seg.data), bytes(seg.memsz - len(seg.data)))
    if ramdisk is not None and initrd_range is not None:
        memory.write(initrd_range.addr, ramdisk)
    if bits == 64:
        _enter_long_mode(vcpu, memory, entry, page_tables=_PAGE_TABLES.addr, gdt_addr=_GDT.addr,
                         stack=_STACK_TOP, identity_gib=_IDENTITY_GIB, gdt=_GDT_64, code=_BOOT_CS,
                         data=_BOOT_DS)
    else:
        _enter_protected_mode(vcpu, memory, entry, gdt_addr=_GDT.addr, stack=_STACK_TOP,
                              gdt=_GDT_32, code=_BOOT_CS, data=_BOOT_DS)
    regs = vcpu.get_regs()
    regs.rsi = _BOOT_PARAMS.addr            # the protocol's one argument; ebp, edi, ebx zero
    regs.rbp = regs.rdi = regs.rbx = 0
    vcpu.set_regs(regs)
    return LinuxBoot(
        format="bzImage" if isinstance(image, _BzImage) else "ELF",
        protocol=image.protocol if isinstance(image, _BzImage) else _ELF_PROTOCOL,
        bits=bits, entry=entry, kernel=kernel_range, boot_params=_BOOT_PARAMS,
        cmdline=Placed(_CMDLINE, len(line)), initrd=initrd_range, gdt=_GDT,
        page_tables=page_tables, e820=tuple(e820))


def _read(source: Source, what: str) -> memoryview:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return memoryview(source).cast("B")
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return memoryview(f.read())
    raise TypeError(f"{what} must be a path or bytes, not {type(source).__name__}")


def _command_line(cmdline: str | bytes, image: _BzImage | _ElfImage) -> bytes:
    if isinstance(cmdline, str):
        cmdline = cmdline.encode()
    if not isinstance(cmdline, bytes):
        raise TypeError(f"cmdline must be str or bytes, not {type(cmdline).__name__}")
    if b"\0" in cmdline:
        raise BootError("the command line holds a NUL byte, which would end it early")
    limit = image.header.cmdline_size if isinstance(image, _BzImage) else _ELF_CMDLINE_SIZE
    room = _HIGH - _CMDLINE - 1                 # it must end below the kernel
    if len(cmdline) > min(limit, room):
        raise BootError(f"the command line is {len(cmdline)} bytes; this kernel takes at most "
                        f"{limit} (cmdline_size), and the loader has room for {room}")
    return cmdline + b"\0"


def _e820(vm: X86Vm, reserved: Iterable[tuple[int, int]]) -> list[E820Entry]:
    """RAM slots, merged where they touch, less the reserved ranges; then the union of those
    ranges and the read-only slots as reserved. Sorted by address, no two overlapping."""
    holes = [_reserved_range(hole) for hole in reserved]
    ram: list[tuple[int, int]] = []
    for region in sorted(vm.memory.regions, key=lambda r: r.guest_phys_addr):
        if region.flags & abi.KVM_MEM_READONLY:
            holes.append((region.guest_phys_addr, region.end))
        elif ram and ram[-1][1] == region.guest_phys_addr:
            ram[-1] = (ram[-1][0], region.end)
        else:
            ram.append((region.guest_phys_addr, region.end))
    merged: list[tuple[int, int]] = []     # the reserved ranges' union: no two entries overlap
    for start, end in sorted(holes):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    for start, end in merged:
        ram = [piece for s, e in ram for piece in ((s, min(e, start)), (max(s, end), e))
               if piece[0] < piece[1]]
    entries = [E820Entry(s, e - s, E820Type.RESERVED) for s, e in merged]
    entries += [E820Entry(s, e - s, E820Type.RAM) for s, e in ram]
    entries.sort()
    if not ram:
        raise BootError("the VM has no RAM: add_memory() before load_linux()")
    if len(entries) > abi.E820_MAX_ENTRIES_ZEROPAGE:
        raise BootError(f"{len(entries)} e820 entries; boot_params holds "
                        f"{abi.E820_MAX_ENTRIES_ZEROPAGE} (merge slots or reserved ranges)")
    return entries


def _reserved_range(hole: tuple[int, int]) -> tuple[int, int]:
    """(start, end) of an (address, size) pair, checked."""
    try:
        addr, size = hole
    except (TypeError, ValueError):
        raise ValueError(f"reserved must hold (address, size) pairs; {hole!r} is not one") from None
    if not (isinstance(addr, int) and isinstance(size, int)) or addr < 0 or size <= 0 \
            or addr + size > 1 << 64:
        raise ValueError(f"reserved range {hole!r} is not (address, size) within 64 bits")
    return addr, addr + size


def _require_ram(ram: list[tuple[int, int]], part: Placed, what: str) -> None:
    if not any(s <= part.addr and part.end <= e for s, e in ram):
        raise BootError(f"{what}: [{part.addr:#x}, {part.end:#x}) ({part.size} bytes) is not "
                        f"all usable RAM; RAM is {_describe(ram)}")


def _describe(ram: list[tuple[int, int]]) -> str:
    return ", ".join(f"[{s:#x}, {e:#x})" for s, e in ram)


def _require_long_mode(vcpu: X86Vcpu) -> None:
    cpuid = vcpu.get_cpuid2()
    if not any(e.function == _LONG_MODE_LEAF and e.edx & _LONG_MODE_BIT
               for e in cpuid.flex_array()[:cpuid.nent]):
        raise BootError("the vCPU's CPUID has no long mode, and KVM refuses a 64-bit entry "
                        "without it: call x86.set_supported_cpuid(vcpu) first (or bits=32)")


def _place_kernel(image: _BzImage | _ElfImage, ram: list[tuple[int, int]],
                  bits: int) -> tuple[Placed, int]:
    """The kernel's range in guest memory and its entry point."""
    ram = [(s, min(e, _KERNEL_TOP)) for s, e in ram if s < _KERNEL_TOP]
    if isinstance(image, _ElfImage):
        if bits != 64:
            raise BootError("an ELF vmlinux has only its 64-bit entry: bits=32 needs a bzImage")
        start = min(s.paddr for s in image.segments)
        extent = Placed(start, max(s.paddr + s.memsz for s in image.segments) - start)
        for seg in image.segments:
            _require_ram(ram, Placed(seg.paddr, seg.memsz),
                         f"the kernel's segment at {seg.paddr:#x} (below 4 GiB, where it runs)")
        if start < _HIGH:
            raise BootError(f"the kernel's segments start at {start:#x}, below 1 MiB where the "
                            "loader keeps its tables")
        return extent, image.entry
    hdr = image.header
    if bits == 64 and not hdr.xloadflags & abi.XLF_KERNEL_64:
        raise BootError("this bzImage has no 64-bit entry point (XLF_KERNEL_64 clear): use bits=32")
    if bits == 64 and len(image.payload) <= ENTRY_64_OFFSET:
        raise BootError(f"this bzImage's kernel is {len(image.payload)} bytes: its 64-bit entry, "
                        f"at {ENTRY_64_OFFSET:#x}, is past its end")
    # The kernel never runs below pref_address (its LOAD_PHYSICAL_ADDR): loaded lower, the
    # decompressor moves itself up there, and needs init_size bytes from there on.
    runs_from = hdr.pref_address if hdr.version >= _PREF_ADDRESS_PROTOCOL else 0
    size = max(hdr.init_size, len(image.payload))
    if image.relocatable:
        addr = _relocated(hdr, size, ram, max(runs_from, _HIGH))
        return Placed(addr, size), addr + (ENTRY_64_OFFSET if bits == 64 else 0)
    addr, run = hdr.code32_start, runs_from or hdr.code32_start
    if min(addr, run) < _HIGH:
        raise BootError(f"this non-relocatable kernel is loaded at {addr:#x} and runs at "
                        f"{run:#x}: below 1 MiB, where the loader keeps its tables")
    _require_ram(ram, Placed(addr, len(image.payload)), "this non-relocatable kernel's image")
    _require_ram(ram, Placed(run, size), f"this non-relocatable kernel's run address (init_size "
                                         f"{hdr.init_size})")
    start = min(addr, run)
    return (Placed(start, max(addr + len(image.payload), run + size) - start),
            addr + (ENTRY_64_OFFSET if bits == 64 else 0))


def _relocated(hdr: abi.setup_header, size: int, ram: list[tuple[int, int]], floor: int) -> int:
    """The lowest kernel_alignment-aligned address at or above floor (pref_address, when the
    header has one) where the kernel's size bytes are RAM: pref_address itself if they fit."""
    align = max(hdr.kernel_alignment, PAGE)
    if align & (align - 1):
        raise BootError(f"the kernel asks for alignment {align:#x}, not a power of two")
    for s, e in ram:
        addr = -(-max(s, floor) // align) * align
        if addr + size <= e:
            return addr
    raise BootError(f"the kernel needs {size} bytes of RAM (init_size {hdr.init_size}) at a "
                    f"{align:#x}-aligned address from {floor:#x} (it never runs below its "
                    f"pref_address) to 4 GiB; RAM there is {_describe(ram)}")


def _place_initrd(data: memoryview, image: _BzImage | _ElfImage, ram: list[tuple[int, int]],
                  kernel: Placed) -> Placed:
    """As high as the kernel allows (initrd_addr_max), page-aligned, clear of the kernel."""
    limit = image.header.initrd_addr_max if isinstance(image, _BzImage) else _ELF_INITRD_MAX
    size = len(data)
    for s, e in reversed(ram):
        for top in (min(e, limit + 1), min(e, limit + 1, kernel.addr)):
            addr = (top - size) & ~(PAGE - 1)
            if addr >= max(s, _HIGH) and (addr + size <= kernel.addr or addr >= kernel.end):
                return Placed(addr, size)
    raise BootError(f"the initrd ({size} bytes) fits nowhere in RAM at or above 1 MiB, below "
                    f"initrd_addr_max {limit:#x} and clear of the kernel at "
                    f"[{kernel.addr:#x}, {kernel.end:#x}); RAM is {_describe(ram)}")


def _boot_params(image: _BzImage | _ElfImage, kernel: Placed, line: bytes, initrd: Placed | None,
                 e820: list[E820Entry]) -> abi.boot_params:
    params = abi.boot_params()
    hdr = params.hdr
    if isinstance(image, _BzImage):
        # The protocol: copy the header as the image has it, then fill in the loader's fields.
        ctypes.memmove(ctypes.addressof(params) + HDR_OFFSET, image.header_bytes,
                       len(image.header_bytes))
        hdr.code32_start = kernel.addr
    else:
        hdr.boot_flag, hdr.header, hdr.version = BOOT_FLAG, HDRS, _ELF_PROTOCOL
        hdr.loadflags = abi.LOADED_HIGH
        hdr.cmdline_size = _ELF_CMDLINE_SIZE
        hdr.kernel_alignment = kernel.addr & -kernel.addr   # where it is: aligned that well
    hdr.type_of_loader = _LOADER_ID
    hdr.cmd_line_ptr = _CMDLINE
    if initrd is not None:
        hdr.ramdisk_image, hdr.ramdisk_size = initrd.addr, initrd.size
    params.e820_entries = len(e820)
    for slot, entry in zip(params.e820_table, e820):
        slot.addr, slot.size, slot.type = entry
    return params
