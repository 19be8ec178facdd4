"""Reading a kernel image: a bzImage's setup header, or an ELF vmlinux's loadable segments.

Plain data out, nothing placed: the loader (boot.py) decides where things go. The
setup header's layout is the kernel's (abi.setup_header, generated from asm/bootparam.h);
the ELF numbers below are the System V ELF format's, which no uapi header we pin defines
for the loader's use.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from ..abi import x86_64 as abi
from ..errors import BootError

# The boot protocol's own numbers (Documentation/arch/x86/boot.rst).
HDRS = int.from_bytes(b"HdrS", "little")   # setup_header.header
BOOT_FLAG = 0xAA55                         # setup_header.boot_flag
MIN_PROTOCOL = 0x0206                      # cmdline_size and a 32-bit-clean header from here
SECTOR = 512                               # setup_sects counts these; 0 means 4
ENTRY_64_OFFSET = 0x200                    # the 64-bit entry, from the 32-bit one (XLF_KERNEL_64)


def _field(struct_type: type, name: str) -> tuple[int, int]:
    """(offset, size) of a generated struct's field."""
    field = getattr(struct_type, name)
    return int(field.offset), int(field.size)


HDR_OFFSET = _field(abi.boot_params, "hdr")[0]   # 0x1f1: where the image has the header too

# System V ELF: identification, header and program-header layouts (ELF-64 object file format).
_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64, _ELFCLASS32, _ELFDATA2LSB, _EM_X86_64, _PT_LOAD = 2, 1, 1, 62, 1
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")   # e_ident .. e_shstrndx (64 bytes)
_PHDR = struct.Struct("<IIQQQQQQ")           # p_type, p_flags, p_offset, p_vaddr, p_paddr, ...


@dataclass(frozen=True)
class BzImage:
    """A bzImage: its setup header (as the image has it) and the protected-mode code after the
    setup sectors, which goes at the load address."""

    header: abi.setup_header
    header_bytes: bytes     # the header as long as the image says it is (its jump's target)
    payload: memoryview

    @property
    def protocol(self) -> int:
        return self.header.version

    @property
    def relocatable(self) -> bool:
        return bool(self.header.relocatable_kernel)


@dataclass(frozen=True)
class ElfSegment:
    paddr: int
    data: memoryview
    memsz: int


@dataclass(frozen=True)
class ElfImage:
    """An ELF64 x86-64 executable (a vmlinux): what goes where, and the physical entry."""

    segments: tuple[ElfSegment, ...]
    entry: int


def parse_kernel(data: memoryview, what: str) -> BzImage | ElfImage:
    """A bzImage or ELF vmlinux from its bytes; BootError, naming `what`, for anything else."""
    if bytes(data[:4]) == _ELF_MAGIC:
        return _parse_elf(data, what)
    if len(data) >= HDR_OFFSET + ctypes.sizeof(abi.setup_header) and \
            _header_field(data, "header") == HDRS:
        return _parse_bzimage(data, what)
    magic_at = HDR_OFFSET + _field(abi.setup_header, "header")[0]
    raise BootError(f"{what} is neither a bzImage (no 'HdrS' at {magic_at:#x}) "
                    "nor an ELF vmlinux (no ELF magic)")


def _header_field(data: memoryview, name: str) -> int:
    offset, size = _field(abi.setup_header, name)
    return int.from_bytes(data[HDR_OFFSET + offset:HDR_OFFSET + offset + size], "little")


def _parse_bzimage(data: memoryview, what: str) -> BzImage:
    version = _header_field(data, "version")
    if version < MIN_PROTOCOL:
        raise BootError(f"{what} speaks boot protocol {version >> 8}.{version & 0xFF:02d}; "
                        f"this loader needs {MIN_PROTOCOL >> 8}.{MIN_PROTOCOL & 0xFF:02d} or "
                        "later (Linux 2.6.22 and newer)")
    if not _header_field(data, "loadflags") & abi.LOADED_HIGH:
        raise BootError(f"{what} is a zImage (LOADED_HIGH clear: it runs at 0x10000); only "
                        "bzImages are loaded")
    # The header ends where its leading jump lands: 0x202 + the jump's 8-bit offset. It must
    # hold the fields its protocol promises (a zero init_size would place the initrd where
    # the kernel decompresses).
    jump = HDR_OFFSET + _field(abi.setup_header, "jump")[0]
    end = jump + 2 + data[jump + 1]
    offset, size = _field(abi.setup_header, "init_size" if version >= 0x020A else "cmdline_size")
    if end < HDR_OFFSET + offset + size:
        raise BootError(f"{what}: its setup header ends at {end:#x} (where its jump lands), "
                        f"short of the fields boot protocol {version >> 8}.{version & 0xFF:02d} "
                        f"has, up to {HDR_OFFSET + offset + size:#x}")
    end = min(end, HDR_OFFSET + ctypes.sizeof(abi.setup_header))
    header_bytes = bytes(data[HDR_OFFSET:end])
    header = abi.setup_header.from_buffer_copy(header_bytes.ljust(ctypes.sizeof(abi.setup_header),
                                                                  b"\0"))
    setup = ((header.setup_sects or 4) + 1) * SECTOR
    if len(data) <= setup:
        raise BootError(f"{what} is cut short: {len(data)} bytes, but its {header.setup_sects} "
                        f"setup sectors alone take {setup}")
    return BzImage(header, header_bytes, data[setup:])


def _parse_elf(data: memoryview, what: str) -> ElfImage:
    if len(data) < _EHDR.size:
        raise BootError(f"{what} is cut short: {len(data)} bytes, less than an ELF header")
    ident, _type, machine, _v, entry, phoff, _sh, _fl, _eh, phentsize, phnum = \
        _EHDR.unpack_from(data)[:11]
    if ident[4] == _ELFCLASS32:
        raise BootError(f"{what} is a 32-bit ELF: only x86-64 vmlinux images are loaded as ELF "
                        "(load a 32-bit kernel's bzImage instead)")
    if ident[4] != _ELFCLASS64 or ident[5] != _ELFDATA2LSB or machine != _EM_X86_64:
        raise BootError(f"{what} is an ELF file, but not a little-endian x86-64 one "
                        f"(class {ident[4]}, data {ident[5]}, machine {machine})")
    if phentsize < _PHDR.size or phoff + phnum * phentsize > len(data):
        raise BootError(f"{what}: its program headers ({phnum} x {phentsize} bytes at "
                        f"{phoff:#x}) are not all inside the file ({len(data)} bytes)")
    segments, virtual = [], []
    for i in range(phnum):
        ptype, _f, offset, vaddr, paddr, filesz, memsz, _a = _PHDR.unpack_from(data, phoff + i * phentsize)
        if ptype != _PT_LOAD or memsz == 0:
            continue
        if filesz > memsz or offset + filesz > len(data):
            raise BootError(f"{what}: segment {i} ({filesz:#x} bytes at file offset {offset:#x}, "
                            f"{memsz:#x} in memory) does not fit the file or itself")
        segments.append(ElfSegment(paddr, data[offset:offset + filesz], memsz))
        virtual.append((vaddr, paddr, memsz))
    if not segments:
        raise BootError(f"{what} has no loadable segment")
    ordered = sorted(segments, key=lambda s: s.paddr)
    for low, high in zip(ordered, ordered[1:]):
        if low.paddr + low.memsz > high.paddr:
            raise BootError(f"{what}: its segments at {low.paddr:#x} ({low.memsz:#x} bytes) and "
                            f"{high.paddr:#x} overlap")
    return ElfImage(tuple(segments), _physical_entry(entry, segments, virtual, what))


def _physical_entry(entry: int, segments: list[ElfSegment],
                    virtual: list[tuple[int, int, int]], what: str) -> int:
    """vmlinux gives its entry as a physical address (phys_startup_64); an image that gives a
    virtual one is translated through the segment holding it."""
    if any(s.paddr <= entry < s.paddr + s.memsz for s in segments):
        return entry
    for vaddr, paddr, memsz in virtual:
        if vaddr <= entry < vaddr + memsz:
            return paddr + entry - vaddr
    raise BootError(f"{what}: its entry point {entry:#x} is in none of its loadable segments")
