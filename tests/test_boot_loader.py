"""x86.load_linux() loads kernels and enters them as the x86 boot protocol says.

The oracle owes nothing to kvm_bindings' generated layouts. The test kernels are built
here with GNU as and ld: a bzImage's setup header is written by assembler directives at
the offsets Documentation/arch/x86/boot.rst gives (tests/guests/boot_setup.S), an ELF
vmlinux is linked by tests/guests/boot_vmlinux.ld and described by readelf. The guests
read boot_params through %rsi at the documented offsets and report what they find, one
value per port write (tests/guests/boot_macros.S); each test states the values it expects.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kvm_bindings import BootError, HltExit, IoExit, x86

from .conftest import GUESTS, REQUIRE_KVM, REQUIRE_TOOLS, need

MIB = 1 << 20
REPORT = 0x3F9                  # boot_macros.S: low 32 bits here, high 32 bits at REPORT + 1
BOOT_MAGIC, HDRS = 0xAA55, int.from_bytes(b"HdrS", "little")
LOADED_HIGH, XLF_KERNEL_64 = 0x01, 0x01    # loadflags bit 0, xloadflags bit 0
E820_RAM, E820_RESERVED = 1, 2
CR0_PE, CR0_NW, CR0_CD, CR0_PG = 1 << 0, 1 << 29, 1 << 30, 1 << 31
RFLAGS_IF, EFER_LMA = 1 << 9, 1 << 10
BOOT_CS, BOOT_DS = 0x10, 0x18   # the protocol's __BOOT_CS and __BOOT_DS
ENTRY_64 = 0x200                # the 64-bit entry, from the start of the protected-mode part
RAM = 32 * MIB

# An ordinary relocatable 64-bit kernel's setup header; each test overrides what it varies.
ORDINARY = {
    "setup_sects": 3,           # the protected-mode part starts at (3 + 1) * 512
    "version": 0x20F,
    "loadflags": LOADED_HIGH,
    "code32_start": 0x100000,
    "initrd_addr_max": 0x7FFFFFFF,
    "kernel_alignment": 0x200000,
    "relocatable_kernel": 1,
    "xloadflags": XLF_KERNEL_64,
    "cmdline_size": 255,
    "pref_address": 0x1400000,  # 20 MiB: neither 1 MiB nor the usual 16 MiB
    "init_size": 0x300000,
    "header_end": 0x26C,        # where the jump at 0x200 lands: the header's length
}
# Register values no loader leaves by accident, set before load_linux() to show it set them.
STALE = {"rsi": 0x5151, "rbp": 0xB0B0, "rdi": 0xD1D1, "rbx": 0xB1B1, "rflags": 0x202}


# ---- building the test kernels ----------------------------------------------

@pytest.fixture(scope="session")
def toolchain(tmp_path_factory):
    need(all(shutil.which(tool) for tool in ("as", "ld", "readelf")),
         "GNU as, ld and readelf (binutils) are not installed", REQUIRE_TOOLS or REQUIRE_KVM)
    return tmp_path_factory.mktemp("boot")


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def _defsyms(symbols: dict[str, int]) -> list[str]:
    return [f"--defsym={name.upper()}={value:#x}" for name, value in symbols.items()]


@pytest.fixture(scope="session")
def bzimage(toolchain):
    """bzimage(guest, **header) -> the bytes of a bzImage: boot_setup.S's setup sectors with
    ORDINARY's header as overridden, then tests/guests/<guest>.S linked at 0."""
    cache: dict[tuple, bytes] = {}

    def build(guest: str, **header: int) -> bytes:
        fields = {**ORDINARY, **header}
        key = (guest, *sorted(fields.items()))
        if key not in cache:
            stem = toolchain / f"{guest}-{len(cache)}"
            parts = []
            for source, defsyms in (("boot_setup", _defsyms(fields)), (guest, [])):
                obj, binary = f"{stem}-{source}.o", f"{stem}-{source}.bin"
                _run("as", "--64", "-I", str(GUESTS), *defsyms, "-o", obj,
                     str(GUESTS / f"{source}.S"))
                _run("ld", "-m", "elf_x86_64", "-Ttext=0", "--oformat", "binary", "-o", binary, obj)
                parts.append(Path(binary).read_bytes())
            setup, payload = parts
            assert len(setup) == (fields["setup_sects"] + 1) * 512    # the header says so
            cache[key] = setup + payload
        return cache[key]
    return build


@pytest.fixture(scope="session")
def vmlinux(toolchain):
    """vmlinux(virt, phys) -> the path of boot_vmlinux.S linked at virt, loaded at phys."""
    def build(virt: int, phys: int) -> Path:
        obj, elf = toolchain / "vmlinux.o", toolchain / f"vmlinux-{virt:x}-{phys:x}.elf"
        if not elf.exists():
            _run("as", "--64", "-I", str(GUESTS), "-o", str(obj), str(GUESTS / "boot_vmlinux.S"))
            _run("ld", "-m", "elf_x86_64", *_defsyms({"kernel_virt": virt, "kernel_phys": phys}),
                 "-T", str(GUESTS / "boot_vmlinux.ld"), "-o", str(elf), str(obj))
        return elf
    return build


def elf_entry(path: Path) -> int:
    """The entry point as readelf reads the ELF header."""
    return int(re.search(r"Entry point address:\s+(0x[0-9a-f]+)", _run("readelf", "-hW", str(path)))[1], 16)


def elf_loads(path: Path) -> list[tuple[int, int, int, int]]:
    """(virtual, physical, file size, memory size) of each PT_LOAD, as readelf lists them."""
    return [tuple(int(field, 16) for field in m.groups()) for m in re.finditer(
        r"^\s*LOAD\s+0x[0-9a-f]+\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)",
        _run("readelf", "-lW", str(path)), re.MULTILINE)]


def elf_section_size(path: Path, name: str) -> int:
    m = re.search(rf"\s{re.escape(name)}\s+\w+\s+[0-9a-f]+\s+[0-9a-f]+\s+([0-9a-f]+)",
                  _run("readelf", "-SW", str(path)))
    return int(m[1], 16)


def hash31(data: bytes) -> int:
    """boot_macros.S's hash31: h = h * 31 + byte, in 32 bits."""
    h = 0
    for byte in data:
        h = (h * 31 + byte) & 0xFFFFFFFF
    return h


# ---- running them -----------------------------------------------------------

@pytest.fixture
def boot_vm(kvm):
    with kvm.create_vm() as vm:
        vm.set_tss_addr(0xFFFBD000)
        yield vm


def new_vcpu(vm, *, long_mode: bool = True):
    """A vCPU holding STALE values; with long_mode, CPUID that offers long mode."""
    vcpu = vm.create_vcpu(0)
    if long_mode:
        x86.set_supported_cpuid(vcpu)
    regs = vcpu.get_regs()
    for name, value in STALE.items():
        setattr(regs, name, value)
    vcpu.set_regs(regs)
    return vcpu


def reports(vcpu) -> list[int]:
    """Run the guest to its hlt; the values it reported (boot_macros.S)."""
    values: list[int] = []
    for _ in range(1000):
        stop = vcpu.run()
        if isinstance(stop, HltExit):
            return values
        assert isinstance(stop, IoExit) and stop.is_write, f"unexpected exit {stop!r}"
        value = int.from_bytes(stop.data, "little")
        if stop.port == REPORT:
            values.append(value)
        else:
            assert stop.port == REPORT + 1 and values, f"unexpected port {stop.port:#x}"
            values[-1] |= value << 32
    raise AssertionError(f"the guest did not halt; it reported {values}")


def boot(vm, kernel, cmdline="", initrd=None, *, bits=64, ram=RAM, **kwargs):
    """RAM at 0 (unless ram=0), a fresh vCPU, load_linux(); -> (the LinuxBoot, its reports)."""
    if ram:
        vm.add_memory(0, ram)
    vcpu = new_vcpu(vm, long_mode=bits == 64)
    loaded = x86.load_linux(vm, vcpu, kernel, cmdline, initrd, bits=bits, **kwargs)
    return loaded, reports(vcpu)


def assert_refused(vm, kernel, match, *, bits=64, long_mode=True, ram=RAM, **kwargs):
    """load_linux() raises BootError matching `match`, with guest memory and the vCPU as they were."""
    vm.add_memory(0, ram)
    vcpu = new_vcpu(vm, long_mode=long_mode)
    before = vm.memory.read(0, ram), bytes(vcpu.get_regs()), bytes(vcpu.get_sregs())
    with pytest.raises(BootError, match=match):
        x86.load_linux(vm, vcpu, kernel, bits=bits, **kwargs)
    assert (vm.memory.read(0, ram), bytes(vcpu.get_regs()), bytes(vcpu.get_sregs())) == before


# ---- bzImage: the 64-bit entry ----------------------------------------------

def test_64_bit_entry_is_at_load_address_plus_0x200_in_long_mode_with_the_boot_segments(
        boot_vm, bzimage):
    loaded, (rip, cs, ds, es, ss, rsi, rflags, cr0, efer) = boot(boot_vm,
                                                                 bzimage("boot_entry64"))
    assert rip == 0x1400000 + ENTRY_64                  # pref_address fits in 32 MiB of RAM
    assert (cs, ds, es, ss) == (BOOT_CS, BOOT_DS, BOOT_DS, BOOT_DS)
    assert rsi == loaded.boot_params.addr != STALE["rsi"]
    assert not rflags & RFLAGS_IF                       # it was set before load_linux()
    assert cr0 & (CR0_PE | CR0_PG) == CR0_PE | CR0_PG
    assert not cr0 & (CR0_CD | CR0_NW)                  # both set at reset
    assert efer & EFER_LMA
    assert loaded.entry == rip and loaded.bits == 64 and loaded.format == "bzImage"


def test_boot_params_holds_the_images_header_with_the_loader_id_filled_in(boot_vm, bzimage):
    _, (boot_flag, header, version, loader, init_size, code32_start, *_cmdline) = boot(
        boot_vm, bzimage("boot_params64", version=0x20C, init_size=0x345000))
    assert (boot_flag, header) == (BOOT_MAGIC, HDRS)
    assert (version, init_size) == (0x20C, 0x345000)    # copied from this image's header
    assert loader == 0xFF                               # "undefined": zero in the image
    assert code32_start == 0x1400000                    # where it went, not the image's 1 MiB


def test_what_was_placed_where_is_shown_in_hex(boot_vm, bzimage):
    loaded, _ = boot(boot_vm, bzimage("boot_where"), "quiet")
    shown = repr(loaded)
    assert "entry=0x1400200" in shown and "protocol=0x20f" in shown and "bits=64" in shown
    assert "kernel=Placed(addr=0x1400000, size=" in shown
    assert "E820Entry(addr=0xa0000, size=0x60000, type=RESERVED)" in shown


def test_cmd_line_ptr_points_at_the_command_line_given(boot_vm, bzimage):
    cmdline = "console=ttyS0 root=/dev/vda1 rw init=/sbin/boot-test"
    _, (*_header, length, digest) = boot(boot_vm, bzimage("boot_params64"), cmdline)
    assert (length, digest) == (len(cmdline), hash31(cmdline.encode()))


def test_a_command_line_of_exactly_cmdline_size_bytes_is_passed_whole(boot_vm, bzimage):
    cmdline = "quiet " * 10 + "x" * 4                   # 64 bytes, the NUL not counted
    _, (*_header, length, digest) = boot(boot_vm, bzimage("boot_params64", cmdline_size=64),
                                         cmdline)
    assert (length, digest) == (64, hash31(cmdline.encode()))


def _e820(values: list[int]) -> list[tuple[int, int, int]]:
    count, *entries = values
    assert len(entries) == 3 * count
    return [tuple(entries[i:i + 3]) for i in range(0, len(entries), 3)]


@pytest.mark.parametrize("layout, reserved, expected", [
    pytest.param(
        [(0, 0x2345000)], None,
        [(0, 0xA0000, E820_RAM), (0xA0000, 0x60000, E820_RESERVED),
         (0x100000, 0x2245000, E820_RAM)],
        id="the legacy hole reserved by default"),
    pytest.param(
        [(0, 0x2345000)], [],
        [(0, 0x2345000, E820_RAM)],
        id="no holes when none are declared"),
    pytest.param(
        [(0, 0x2345000), (0x100000000, 0x2D000)], None,
        [(0, 0xA0000, E820_RAM), (0xA0000, 0x60000, E820_RESERVED),
         (0x100000, 0x2245000, E820_RAM), (0x100000000, 0x2D000, E820_RAM)],
        id="a second slot above 4 GiB"),
    pytest.param(
        [(0, 0x2345000)], [(0xA0000, 0x60000), (0x2000000, 0x7000)],
        [(0, 0xA0000, E820_RAM), (0xA0000, 0x60000, E820_RESERVED),
         (0x100000, 0x1F00000, E820_RAM), (0x2000000, 0x7000, E820_RESERVED),
         (0x2007000, 0x33E000, E820_RAM)],
        id="a declared hole splits RAM"),
    pytest.param(
        [(0, 0x2345000), (0xFFFF0000, 0x10000, "readonly")], None,
        [(0, 0xA0000, E820_RAM), (0xA0000, 0x60000, E820_RESERVED),
         (0x100000, 0x2245000, E820_RAM), (0xFFFF0000, 0x10000, E820_RESERVED)],
        id="a read-only slot is reserved"),
])
def test_e820_map_lists_the_ram_slots_less_the_holes(boot_vm, bzimage, layout, reserved,
                                                     expected):
    for addr, size, *readonly in layout:
        boot_vm.add_memory(addr, size, readonly=bool(readonly))
    holes = {} if reserved is None else {"reserved": reserved}
    loaded, values = boot(boot_vm, bzimage("boot_e820"), ram=0, **holes)
    assert _e820(values) == expected
    assert [tuple(entry) for entry in loaded.e820] == expected


# ---- bzImage: the 32-bit entry ----------------------------------------------

def test_32_bit_entry_is_protected_mode_without_paging_and_esi_at_boot_params(boot_vm, bzimage):
    loaded, (esi, ebp, edi, ebx, eip, cs, ds, es, ss, eflags, cr0, header) = boot(
        boot_vm, bzimage("boot_entry32"), bits=32)
    assert eip == 0x1400000                             # the load address itself
    assert (cs, ds, es, ss) == (BOOT_CS, BOOT_DS, BOOT_DS, BOOT_DS)
    assert not eflags & RFLAGS_IF
    assert cr0 & CR0_PE and not cr0 & CR0_PG
    assert not cr0 & (CR0_CD | CR0_NW)
    assert esi == loaded.boot_params.addr and header == HDRS
    assert (ebp, edi, ebx) == (0, 0, 0)                 # STALE before load_linux()
    assert loaded.page_tables is None and loaded.bits == 32


# ---- bzImage: the initrd -----------------------------------------------------

def test_initrd_goes_page_aligned_below_initrd_addr_max_and_clear_of_the_kernel(boot_vm, bzimage):
    # The kernel ends exactly at initrd_addr_max + 1, so the highest place the limit allows
    # overlaps it: the initrd must go below the kernel, though RAM runs to 64 MiB.
    kernel = bzimage("boot_initrd", pref_address=0x1C00000, init_size=0x400000,
                     initrd_addr_max=0x1FFFFFF)
    initrd = bytes((i * 131 + 7) % 251 for i in range(0x12345))
    loaded, (image, size, digest) = boot(boot_vm, kernel, "", initrd, ram=64 * MIB)
    assert (size, digest) == (len(initrd), hash31(initrd))
    assert image % 0x1000 == 0
    assert image + size - 1 <= 0x1FFFFFF
    assert image + size <= 0x1C00000                    # below the kernel
    assert image >= 0x100000
    assert loaded.initrd == (image, size)


# ---- bzImage: where the kernel goes ---------------------------------------------

def test_relocatable_kernel_goes_at_pref_address_when_it_fits(boot_vm, bzimage):
    loaded, (rip,) = boot(boot_vm, bzimage("boot_where", pref_address=0x1600000))
    assert rip == 0x1600000 + ENTRY_64
    assert loaded.kernel == (0x1600000, ORDINARY["init_size"])


@pytest.mark.parametrize("reserved, load", [
    pytest.param([(0xA0000, 0x60000), (0x1500000, 0x1000)], 0x1800000,
                 id="the next aligned address when a hole takes pref_address"),
    pytest.param([(0xA0000, 0x60000), (0x1500000, 0x1000), (0x1900000, 0x1000)], 0x1C00000,
                 id="and the one after that"),
])
def test_relocatable_kernel_goes_at_the_next_aligned_address_above_pref_address_that_fits(
        boot_vm, bzimage, reserved, load):
    # Never below pref_address: the decompressor would move itself up there anyway.
    kernel = bzimage("boot_where", pref_address=0x1400000, kernel_alignment=0x400000)
    _, (rip,) = boot(boot_vm, kernel, ram=64 * MIB, reserved=reserved)
    assert rip == load + ENTRY_64


def test_relocatable_kernel_is_refused_when_nothing_fits_above_pref_address(boot_vm, bzimage):
    # 16 MiB of RAM would hold the kernel at 4 MiB, but it runs from pref_address (20 MiB).
    kernel = bzimage("boot_where", pref_address=0x1400000, kernel_alignment=0x400000)
    assert_refused(boot_vm, kernel, r"from 0x1400000 \(it never runs below its pref_address\)",
                   ram=16 * MIB)


def test_non_relocatable_kernel_goes_at_code32_start(boot_vm, bzimage):
    kernel = bzimage("boot_where", relocatable_kernel=0, code32_start=0x300000)
    _, (rip,) = boot(boot_vm, kernel)                   # pref_address (20 MiB) also fits
    assert rip == 0x300000 + ENTRY_64


def test_fields_past_the_end_of_an_older_header_are_not_read(boot_vm, bzimage):
    # Protocol 2.06: the header ends after cmdline_size (0x23c); pref_address and init_size
    # are 2.10 fields, so the bytes at 0x258 and 0x260 are this kernel's setup code.
    kernel = bzimage("boot_where", version=0x206, header_end=0x23C, xloadflags=0,
                     pref_address=0x1400000, init_size=0x7000000)   # init_size > RAM
    _, (eip,) = boot(boot_vm, kernel, bits=32)
    assert eip == 0x200000                              # the lowest 2 MiB-aligned above 1 MiB


def test_non_relocatable_kernel_needs_init_size_of_ram_at_pref_address(boot_vm, bzimage):
    # Loaded at code32_start, it moves itself to pref_address (20 MiB): 16 MiB is too little.
    kernel = bzimage("boot_where", relocatable_kernel=0, code32_start=0x300000)
    assert_refused(boot_vm, kernel, "non-relocatable kernel's run address", ram=16 * MIB)


def test_image_without_xlf_kernel_64_is_entered_at_its_32_bit_entry(boot_vm, bzimage):
    _, (eip,) = boot(boot_vm, bzimage("boot_where", xloadflags=0), bits=32)
    assert eip == 0x1400000


# ---- bzImage: what is refused, before anything is written -----------------------

def test_init_size_larger_than_ram_is_refused_naming_the_size(boot_vm, bzimage):
    size = 0x2345000
    assert_refused(boot_vm, bzimage("boot_where", init_size=size), rf"{size}|{size:#x}")


def test_command_line_longer_than_cmdline_size_is_refused(boot_vm, bzimage):
    assert_refused(boot_vm, bzimage("boot_where", cmdline_size=64), "cmdline_size",
                   cmdline="quiet " * 10 + "x" * 5)   # 65 bytes


def test_boot_protocol_before_2_06_is_refused(boot_vm, bzimage):
    assert_refused(boot_vm, bzimage("boot_where", version=0x205), "protocol 2.05")


def test_zimage_without_loaded_high_is_refused(boot_vm, bzimage):
    assert_refused(boot_vm, bzimage("boot_where", loadflags=0), "zImage")


def test_64_bit_entry_into_an_image_without_xlf_kernel_64_is_refused(boot_vm, bzimage):
    assert_refused(boot_vm, bzimage("boot_where", xloadflags=0), "XLF_KERNEL_64")


def test_64_bit_entry_without_long_mode_in_cpuid_is_refused(boot_vm, bzimage):
    assert_refused(boot_vm, bzimage("boot_where"), "set_supported_cpuid", long_mode=False)


# ---- ELF vmlinux ----------------------------------------------------------------

def test_elf_vmlinux_is_entered_at_its_entry_with_bss_cleared_and_boot_params_in_rsi(
        boot_vm, vmlinux):
    elf = vmlinux(0x1000000, 0x1000000)
    boot_vm.add_memory(0, RAM)
    for _virt, phys, filesz, memsz in elf_loads(elf):  # what the loader must clear
        boot_vm.memory.write(phys + filesz, b"\xa5" * (memsz - filesz))
    cmdline = "console=ttyS0 vmlinux-test=1"
    loaded, (rip, rsi, boot_flag, header, version, loadflags, cmdline_size, length, digest,
             data_word, bss_size, bss_sum) = boot(boot_vm, elf.read_bytes(), cmdline, ram=0)
    entry = elf_entry(elf)
    assert entry != min(phys for _v, phys, _f, _m in elf_loads(elf))  # not the segment start
    assert rip == entry
    assert rsi == loaded.boot_params.addr and (boot_flag, header) == (BOOT_MAGIC, HDRS)
    # No header in the file: the loader writes one a kernel can read the command line by.
    assert version >= 0x206 and loadflags & LOADED_HIGH and cmdline_size >= len(cmdline)
    assert (length, digest) == (len(cmdline), hash31(cmdline.encode()))
    assert data_word == 0x0123456789ABCDEF
    assert bss_size == elf_section_size(elf, ".bss") == 0x1235
    assert bss_sum == 0
    assert loaded.format == "ELF"


def test_elf_entry_given_as_a_virtual_address_is_entered_at_its_physical_address(boot_vm,
                                                                                 vmlinux):
    elf = vmlinux(0xFFFFFFFF81000000, 0x1000000)
    entry = elf_entry(elf)
    [(virt, phys)] = [(v, p) for v, p, _f, memsz in elf_loads(elf) if v <= entry < v + memsz]
    assert virt != phys
    _, (rip, *_rest) = boot(boot_vm, str(elf))          # by path, this time
    assert rip == entry - virt + phys == 0x1000040


def test_32_bit_elf_is_refused(boot_vm, toolchain):
    obj, elf = toolchain / "vmlinux32.o", toolchain / "vmlinux32.elf"
    _run("as", "--32", "-o", str(obj), str(GUESTS / "boot_vmlinux32.S"))
    _run("ld", "-m", "elf_i386", "-Ttext=0x1000000", "-o", str(elf), str(obj))
    assert_refused(boot_vm, elf.read_bytes(), "32-bit ELF")
