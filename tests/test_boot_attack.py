"""Attacks on x86.load_linux(): malformed kernels, misuse, resources, reloading.

The loader's contract: bad input raises a typed error (BootError for kernels, initrds,
command lines and memory that do not fit; TypeError/ValueError for wrong arguments;
StaleHandleError for closed or foreign handles), and when it raises, guest memory and the
vCPU's registers are exactly as before. Kernels are built here with struct at the offsets
of Documentation/arch/x86/boot.rst and the ELF-64 object file format.
"""

from __future__ import annotations

import os
import random
import struct

import pytest

from kvm_bindings import BootError, IoExit, StaleHandleError, x86

MiB = 1 << 20
RAM = 32 * MiB
BOOT_PARAMS = 0x7000
# The guest code both test kernels run: write `marker` to port 0x3f8, then hlt (the same
# bytes in 32- and 64-bit mode: mov dx, 0x3f8; mov al, imm8; out dx, al; hlt).
PORT = 0x3F8


def marker_code(marker: int) -> bytes:
    return bytes.fromhex("66baf803b0") + bytes([marker]) + bytes.fromhex("eef4")


def bzimage(*, setup_sects: int = 1, payload: int = 0x1000, marker: int = 0x41,
            **fields: int) -> bytearray:
    """A minimal relocatable bzImage (protocol 2.15) whose 32- and 64-bit entries write marker."""
    values = {"version": 0x020F, "loadflags": 0x01, "code32_start": 0x100000,
              "initrd_addr_max": 0x7FFFFFFF, "kernel_alignment": 0x200000,
              "relocatable_kernel": 1, "xloadflags": 0x3, "cmdline_size": 2047,
              "pref_address": 0x1000000, "init_size": 0x400000, "jump": 0x268 - 0x202}
    values.update(fields)
    setup = ((setup_sects or 4) + 1) * 512
    img = bytearray(setup + payload)
    struct.pack_into("<B", img, 0x1F1, setup_sects)
    struct.pack_into("<H", img, 0x1FE, 0xAA55)
    struct.pack_into("<BB", img, 0x200, 0xEB, values["jump"])
    img[0x202:0x206] = b"HdrS"
    for offset, fmt, name in ((0x206, "H", "version"), (0x211, "B", "loadflags"),
                              (0x214, "I", "code32_start"), (0x22C, "I", "initrd_addr_max"),
                              (0x230, "I", "kernel_alignment"), (0x234, "B", "relocatable_kernel"),
                              (0x236, "H", "xloadflags"), (0x238, "I", "cmdline_size"),
                              (0x258, "Q", "pref_address"), (0x260, "I", "init_size")):
        struct.pack_into("<" + fmt, img, offset, values[name])
    code = marker_code(marker)
    for entry in (0, 0x200):                  # 32-bit entry, 64-bit entry
        if entry + len(code) <= payload:
            img[setup + entry:setup + entry + len(code)] = code
    return img


EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")


def elf(segments: list[tuple[int, int, int, int]] | None = None, *, entry: int = 0x1000000,
        phoff: int | None = None, phnum: int | None = None, phentsize: int = PHDR.size,
        ident: bytes = b"\x7fELF\x02\x01\x01", machine: int = 62, marker: int = 0x45) -> bytearray:
    """A minimal ELF64 x86-64 executable; segments are (p_offset, p_paddr, p_filesz, p_memsz)
    (default: one PT_LOAD of 0x1000 bytes at 16 MiB, file offset 0x1000, starting with the
    marker code)."""
    segments = segments if segments is not None else [(0x1000, 0x1000000, 0x1000, 0x2000)]
    table = EHDR.size if phoff is None else phoff
    img = bytearray(0x2000)
    img[0x1000:0x1000 + 8] = marker_code(marker)
    EHDR.pack_into(img, 0, ident.ljust(16, b"\0"), 2, machine, 1, entry, table, 0, 0, EHDR.size,
                   phentsize, len(segments) if phnum is None else phnum, 0, 0, 0)
    for i, (offset, paddr, filesz, memsz) in enumerate(segments):
        at = table + i * phentsize
        if at + PHDR.size <= len(img):
            PHDR.pack_into(img, at, 1, 5, offset, paddr | 0xFFFFFFFF80000000, paddr,
                           filesz % (1 << 64), memsz, 0x200000)
    return img


@pytest.fixture
def machine(kvm):
    """A VM with 32 MiB of RAM at 0 and one vCPU with KVM's supported CPUID."""
    with kvm.create_vm() as vm:
        vm.set_tss_addr(0xFFFBD000)
        vm.add_memory(0, RAM)
        vcpu = vm.create_vcpu(0)
        x86.set_supported_cpuid(vcpu)
        yield vm, vcpu


@pytest.fixture
def small_machine(kvm):
    """2 MiB of RAM: for the many-case tests that refuse before placing anything."""
    with kvm.create_vm() as vm:
        vm.set_tss_addr(0xFFFBD000)
        vm.add_memory(0, 2 * MiB)
        vcpu = vm.create_vcpu(0)
        x86.set_supported_cpuid(vcpu)
        yield vm, vcpu


def memory_of(vm) -> tuple[bytes, ...]:
    """All of guest memory, slot by slot."""
    return tuple(vm.memory.read(r.guest_phys_addr, r.size) for r in vm.memory.regions)


def state(vm, vcpu) -> tuple[bytes, ...]:
    """All of guest memory, and the vCPU's regs and sregs, as bytes."""
    return (*memory_of(vm), bytes(vcpu.get_regs()), bytes(vcpu.get_sregs()))


def refused(error: type[BaseException], vm, vcpu, kernel, *args, **kwargs) -> str:
    """load_linux(...) raises error (exactly that family) and changes nothing; its message."""
    before = state(vm, vcpu)
    with pytest.raises(error) as info:
        x86.load_linux(vm, vcpu, kernel, *args, **kwargs)
    assert state(vm, vcpu) == before, "load_linux raised but changed guest memory or the vCPU"
    return str(info.value)


def check_placement(vm, vcpu, boot, kernel: bytes | bytearray, initrd: bytes | None) -> None:
    """What a successful load must hold, whatever the image: everything in RAM, nothing on top
    of anything else, the bytes where LinuxBoot says, the vCPU at the entry."""
    ram = [(e.addr, e.addr + e.size) for e in boot.e820 if e.type == x86.E820Type.RAM]

    def in_ram(part) -> bool:
        return any(s <= part.addr and part.end <= e for s, e in ram)

    assert in_ram(boot.kernel) and 1 * MiB <= boot.kernel.addr and boot.kernel.end <= 1 << 32
    assert boot.kernel.addr <= boot.entry < boot.kernel.end
    assert boot.cmdline.end <= boot.kernel.addr
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    assert (regs.rip, regs.rsi) == (boot.entry, BOOT_PARAMS)
    assert bool(sregs.cr0 & x86.CR0_PG) == (boot.bits == 64)
    assert vm.memory.read(BOOT_PARAMS + 0x202, 4) == b"HdrS"
    if boot.format == "bzImage":
        setup = ((kernel[0x1F1] or 4) + 1) * 512
        assert boot.kernel.addr % max(4096, int.from_bytes(kernel[0x230:0x234], "little")) == 0 \
            or not kernel[0x234]
        assert vm.memory.read(boot.kernel.addr, len(kernel) - setup) == bytes(kernel[setup:])
        pref = int.from_bytes(kernel[0x258:0x260], "little")
        if kernel[0x234] and int.from_bytes(kernel[0x206:0x208], "little") >= 0x20A:
            assert boot.kernel.addr >= pref         # it never runs below pref_address
    if initrd is not None:
        assert in_ram(boot.initrd) and boot.initrd.addr >= 1 * MiB
        assert boot.initrd.end <= boot.kernel.addr or boot.initrd.addr >= boot.kernel.end
        assert vm.memory.read(boot.initrd.addr, len(initrd)) == initrd
        assert vm.memory.read_int(BOOT_PARAMS + 0x218, 4) == boot.initrd.addr
    else:
        assert boot.initrd is None


# -- 1. malformed images, fuzzed ---------------------------------------------------------

BZ_FIELDS = {   # name -> (offset, size) in the image
    "setup_sects": (0x1F1, 1), "jump": (0x201, 1), "version": (0x206, 2), "loadflags": (0x211, 1),
    "code32_start": (0x214, 4), "initrd_addr_max": (0x22C, 4), "kernel_alignment": (0x230, 4),
    "relocatable_kernel": (0x234, 1), "xloadflags": (0x236, 2), "cmdline_size": (0x238, 4),
    "pref_address": (0x258, 8), "init_size": (0x260, 4)}
NASTY = {  # values worth trying per field, besides random ones
    "setup_sects": [0, 1, 4, 255],
    "init_size": [0, 1, 0x1FF000, 0xFFFFFFFF, RAM, RAM - MiB],
    "kernel_alignment": [0, 1, 3, 0x1001, 0x200000, 0x80000000, 0xFFFFFFFF],
    "pref_address": [0, 0x1000001, 0x100000, RAM, 1 << 32, (1 << 64) - 0x200000, (1 << 64) - 1],
    "code32_start": [0, 0xFFFFF, 0x100000, 0x1000000, 0xFFFFF000, 0xFFFFFFFF],
    "relocatable_kernel": [0, 1, 0xFF],
    "xloadflags": [0, 1, 2, 0xFFFF],
    "jump": [0, 0x10, 0x36, 0x5E, 0x66, 0x7F, 0x80, 0xFF],
    "version": [0, 0x0205, 0x0206, 0x0209, 0x020A, 0xFFFF],
    "initrd_addr_max": [0, 0xFFFFF, 0x1FFFFFF, 0xFFFFFFFF],
    "cmdline_size": [0, 1, 0xFFFFFFFF],
    "loadflags": [0, 0xFF],
}
INITRDS = [None, b"\x5a" * 4096, bytes(range(256)) * 4096, bytes(RAM + 4096)]


def mutate_bzimage(rng: random.Random) -> bytearray:
    img = bzimage(payload=rng.choice([0x10, 0x200, 0x1000, 0x10000]))
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.8:
            name = rng.choice(sorted(BZ_FIELDS))
            offset, size = BZ_FIELDS[name]
            value = rng.choice(NASTY.get(name, [0])) if rng.random() < 0.7 else \
                rng.getrandbits(8 * size)
            img[offset:offset + size] = (value % (1 << 8 * size)).to_bytes(size, "little")
        else:
            img[rng.randrange(0x1F1, 0x270)] = rng.getrandbits(8)
    if rng.random() < 0.1:
        del img[rng.randrange(len(img)):]
    return img


def mutate_elf(rng: random.Random) -> bytearray:
    base = 0x1000000
    segments = [(0x1000, base, 0x1000, 0x2000)]
    kw: dict = {}
    for _ in range(rng.randint(0, 2)):
        what = rng.choice(["phoff", "phnum", "phentsize", "filesz", "offset", "paddr", "entry",
                           "none", "overlap", "second", "ident", "machine", "memsz", "cut"])
        offset, paddr, filesz, memsz = segments[0]
        if what == "phoff":
            kw["phoff"] = rng.choice([0, 1, 0x1FF8, 0x2000, (1 << 64) - 1, rng.getrandbits(64)])
        elif what == "phnum":
            kw["phnum"] = rng.choice([0, 2, 0xFFFF, rng.getrandbits(16)])
        elif what == "phentsize":
            kw["phentsize"] = rng.choice([0, 1, PHDR.size - 1, PHDR.size + 8, 0xFFFF])
        elif what == "filesz":
            segments[0] = (offset, paddr, memsz + rng.choice([1, 0x1000]), memsz)
        elif what == "memsz":
            segments[0] = (offset, paddr, 0, rng.choice([0, RAM, 1 << 32, (1 << 64) - 1]))
        elif what == "offset":
            segments[0] = (rng.choice([0x1FFF, 0x2000, (1 << 64) - 1]), paddr, filesz, memsz)
        elif what == "paddr":
            segments[0] = (offset, rng.choice([0, 0xFF000, RAM - 0x1000, (1 << 32) - 0x1000,
                                               (1 << 64) - 0x1000, (1 << 64) - 1]), filesz, memsz)
        elif what == "entry":
            kw["entry"] = rng.choice([0, base - 1, base + 0x2000, (1 << 64) - 1,
                                      0xFFFFFFFF81000000, 0xFFFFFFFF81001FFF])
        elif what == "none":
            segments.clear()
            segments.append((0x1000, base, 0x1000, 0x2000))
            kw["phnum"] = 0
        elif what in ("overlap", "second"):
            gap = rng.choice([0x1000, 0x1FFF]) if what == "overlap" else 0x2000
            segments.append((0x1000, base + gap, 0x100, 0x1000))
        elif what == "ident":
            kw["ident"] = rng.choice([b"\x7fELF\x01\x01\x01", b"\x7fELF\x02\x02\x01", b"\x7fELF"])
        elif what == "machine":
            kw["machine"] = rng.choice([0, 3, 183])
    img = elf(segments, **kw)
    if rng.random() < 0.2:
        del img[rng.randrange(len(img)):]
    return img


@pytest.mark.parametrize("kind", ["bzImage", "ELF"])
def test_fuzzed_images_raise_only_boot_error_and_touch_nothing_when_refused(machine, kind):
    vm, vcpu = machine
    rng = random.Random(0xB007 + len(kind))
    before = state(vm, vcpu)
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(150):
        image = mutate_bzimage(rng) if kind == "bzImage" else mutate_elf(rng)
        bits = rng.choice([32, 64])
        initrd = rng.choice(INITRDS)
        reserved = rng.choice([(x86.LEGACY_HOLE,), ()])
        try:
            boot = x86.load_linux(vm, vcpu, image, "console=ttyS0", initrd, bits=bits,
                                  reserved=reserved)
        except BootError:
            assert state(vm, vcpu) == before, f"case {case}: refused, but state changed"
            outcomes["refused"] += 1
            continue
        check_placement(vm, vcpu, boot, image, initrd)
        outcomes["loaded"] += 1
        before = state(vm, vcpu)
    # Both ways taken often: a loader that refused everything (or nothing) fails here.
    assert min(outcomes.values()) >= 10, outcomes


def test_every_cut_of_a_bzimage_before_its_kernel_is_refused(small_machine):
    vm, vcpu = small_machine
    image = bzimage()
    setup = 2 * 512
    for cut in [*range(0, 0x280), *range(0x280, setup + 1, 37), setup]:
        message = refused(BootError, vm, vcpu, bytes(image[:cut]))
        assert "neither a bzImage" in message or "cut short" in message


def test_every_cut_of_an_elf_header_or_program_header_is_refused(small_machine):
    vm, vcpu = small_machine
    image = elf()
    for cut in range(0, EHDR.size + PHDR.size):
        message = refused(BootError, vm, vcpu, bytes(image[:cut]))
        if cut < 4:                 # not even the ELF magic: neither format
            assert "neither a bzImage" in message, (cut, message)
        elif cut < EHDR.size:
            assert f"cut short: {cut} bytes, less than an ELF header" in message, (cut, message)
        else:
            assert "program headers" in message and "not all inside the file" in message
    message = refused(BootError, vm, vcpu, bytes(image[:0x1800]))   # inside the segment's bytes
    assert "segment 0" in message and "does not fit the file" in message


@pytest.mark.parametrize("fields, says", [
    ({"init_size": 0xFFFFFFFF}, "needs 4294967295 bytes"),
    ({"kernel_alignment": 0x3000}, "not a power of two"),
    ({"kernel_alignment": 0x80000000}, "0x80000000-aligned"),
    ({"relocatable_kernel": 0, "code32_start": 0xFFFFF}, "below 1 MiB"),
    ({"relocatable_kernel": 0, "code32_start": 0xFFFFF000}, "non-relocatable"),
    ({"version": 0x0205}, "needs 2.06"),
    ({"loadflags": 0}, "zImage"),
    ({"xloadflags": 0}, "no 64-bit entry"),
])
def test_bzimage_header_mutations_are_refused(machine, fields, says):
    vm, vcpu = machine
    assert says in refused(BootError, vm, vcpu, bzimage(**fields))


def test_a_bzimage_shorter_than_its_setup_sectors_is_refused(machine):
    vm, vcpu = machine
    image = bzimage(setup_sects=1, payload=0x1000)
    image[0x1F1] = 255
    assert "cut short" in refused(BootError, vm, vcpu, image)


def test_an_unaligned_pref_address_is_rounded_up_to_the_alignment(machine):
    vm, vcpu = machine
    image = bzimage(pref_address=0x1000001)
    boot = x86.load_linux(vm, vcpu, image)
    assert boot.kernel.addr == 0x1200000            # the next 2 MiB boundary, not below pref
    check_placement(vm, vcpu, boot, image, None)


@pytest.mark.parametrize("pref", [RAM + 0x200000, 1 << 32, (1 << 64) - 0x200000])
def test_a_pref_address_beyond_ram_is_refused_though_lower_ram_would_hold_the_image(machine, pref):
    # The kernel never runs below pref_address: placing it lower only moves the failure
    # into the guest, where the decompressor relocates itself past the end of RAM.
    vm, vcpu = machine
    assert "never runs below its pref_address" in refused(BootError, vm, vcpu,
                                                          bzimage(pref_address=pref))


@pytest.mark.parametrize("jump", [0, 0x10, 0x35, 0x61])
def test_a_header_shorter_than_its_protocol_is_refused(machine, jump):
    # Found: the jump at 0x200 says where the header ends; one ending before init_size was
    # read as init_size 0, so the kernel got only its file's size and the initrd went where
    # it decompresses. (0x62 ends it exactly after init_size, 0x36 after cmdline_size.)
    vm, vcpu = machine
    image = bzimage(jump=jump)
    assert "short of the fields" in refused(BootError, vm, vcpu, image, initrd=b"\1" * 4096)
    old = bzimage(jump=jump, version=0x0206)
    if jump < 0x36:                             # short of 2.06's cmdline_size too
        assert "short of the fields" in refused(BootError, vm, vcpu, old, bits=32)


def test_a_header_just_long_enough_for_its_protocol_loads(machine):
    vm, vcpu = machine
    image = bzimage(jump=0x62)
    check_placement(vm, vcpu, x86.load_linux(vm, vcpu, image), image, None)


def test_a_bzimage_too_short_for_its_64_bit_entry_is_refused(machine):
    # Found: a kernel of 0x10 bytes was entered at its load address + 0x200, past its end.
    vm, vcpu = machine
    assert "past its end" in refused(BootError, vm, vcpu, bzimage(payload=0x200))
    boot = x86.load_linux(vm, vcpu, bzimage(payload=0x10), bits=32)   # its 32-bit entry is in it
    assert boot.entry == boot.kernel.addr


@pytest.mark.parametrize("kw, says", [
    ({"phoff": (1 << 64) - 1}, "program headers"),
    ({"phnum": 0xFFFF}, "program headers"),
    ({"phentsize": PHDR.size - 1}, "program headers"),
    ({"phnum": 0}, "no loadable segment"),
    ({"segments": [(0x1000, 0x1000000, 0x2001, 0x2000)]}, "does not fit"),
    ({"segments": [(0x1FFF, 0x1000000, 0x2, 0x2000)]}, "does not fit"),
    ({"segments": [(0x1000, (1 << 64) - 0x2000, 0x1000, 0x2000)], "entry": (1 << 64) - 0x2000},
     "not all usable RAM"),
    ({"segments": [(0x1000, (1 << 64) - 0x1000, 0x1000, 0x2000)], "entry": (1 << 64) - 0x1000},
     "not all usable RAM"),                       # paddr + memsz is past 2^64
    ({"segments": [(0x1000, 0x10000, 0x1000, 0x2000)], "entry": 0x10000}, "below 1 MiB"),
    ({"entry": 0x1002000}, "none of its loadable segments"),
    ({"entry": (1 << 64) - 1}, "none of its loadable segments"),
    ({"ident": b"\x7fELF\x01\x01\x01"}, "32-bit ELF"),
    ({"machine": 183}, "not a little-endian x86-64"),
])
def test_elf_mutations_are_refused(machine, kw, says):
    vm, vcpu = machine
    assert says in refused(BootError, vm, vcpu, elf(**kw))


@pytest.mark.parametrize("second", [0x1000000, 0x1001000, 0x1001FFF, 0xFFF000])
def test_overlapping_elf_segments_are_refused(machine, second):
    # Found: overlapping segments were loaded in turn, the second's bss zeroing the first.
    vm, vcpu = machine
    image = elf([(0x1000, 0x1000000, 0x1000, 0x2000), (0x1000, second, 0x100, 0x2000)])
    assert "overlap" in refused(BootError, vm, vcpu, image)


def test_touching_elf_segments_load(machine):
    vm, vcpu = machine
    image = elf([(0x1000, 0x1000000, 0x1000, 0x2000), (0x1000, 0x1002000, 0x100, 0x1000)])
    boot = x86.load_linux(vm, vcpu, image)
    assert boot.kernel == x86.Placed(0x1000000, 0x3000)
    assert vm.memory.read(0x1002000, 0x100) == bytes(image[0x1000:0x1100])


# -- kernels the vCPU could not reach -----------------------------------------------------

@pytest.fixture
def high_machine(kvm):
    """2 MiB of RAM at 0 and 16 MiB at 4 GiB: a kernel of 4 MiB fits only above 4 GiB."""
    with kvm.create_vm() as vm:
        vm.set_tss_addr(0xFFFBD000)
        vm.add_memory(0, 2 * MiB)
        vm.add_memory(1 << 32, 16 * MiB)
        vcpu = vm.create_vcpu(0)
        x86.set_supported_cpuid(vcpu)
        yield vm, vcpu


@pytest.mark.parametrize("bits", [64, 32])
def test_a_kernel_is_not_placed_above_4gib(high_machine, bits):
    # Found: it went to 4 GiB: a 64-bit entry outside the 4 GiB identity map, and for 32 bits
    # a ValueError from the mode setup after the kernel was already written.
    vm, vcpu = high_machine
    assert "needs 4194304 bytes" in refused(BootError, vm, vcpu, bzimage(pref_address=1 << 32),
                                            bits=bits)


def test_an_elf_segment_above_4gib_is_refused(high_machine):
    vm, vcpu = high_machine
    image = elf([(0x1000, 1 << 32, 0x1000, 0x2000)], entry=1 << 32)
    assert "not all usable RAM" in refused(BootError, vm, vcpu, image)


def test_a_command_line_reaching_the_kernel_is_refused(machine):
    # Found: with no legacy hole and a kernel allowing a huge cmdline_size, a 1 MiB command
    # line at 0x20000 ran over the kernel at 1 MiB+.
    vm, vcpu = machine
    image = bzimage(cmdline_size=0xFFFFFFFF, pref_address=0x100000, kernel_alignment=0x100000)
    line = "x" * (1 * MiB)
    assert "room for" in refused(BootError, vm, vcpu, image, line, reserved=())
    room = 0x100000 - 0x20000 - 1
    boot = x86.load_linux(vm, vcpu, image, "y" * room, reserved=())
    assert boot.cmdline.end == boot.kernel.addr == 0x100000


# -- 2. misuse ------------------------------------------------------------------------------

def test_a_vcpu_of_another_vm_is_refused(kvm, machine):
    vm, vcpu = machine
    with kvm.create_vm() as other:
        other.add_memory(0, RAM)
        stranger = other.create_vcpu(0)
        x86.set_supported_cpuid(stranger)
        before = state(other, stranger)
        assert "another VM" in refused(StaleHandleError, vm, stranger, bzimage())
        assert state(other, stranger) == before


@pytest.mark.parametrize("bits", [64, 32])
def test_a_closed_vcpu_is_refused_before_memory_is_written(machine, bits):
    # Found: with bits=32 nothing asked the vCPU before the kernel was written.
    vm, vcpu = machine
    before = memory_of(vm)
    vcpu.close()
    with pytest.raises(StaleHandleError, match="closed"):
        x86.load_linux(vm, vcpu, bzimage(), bits=bits)
    assert memory_of(vm) == before


def test_a_closed_vm_is_refused_as_closed(machine):
    # Found: a closed VM said "the VM has no RAM".
    vm, vcpu = machine
    vm.close()
    with pytest.raises(StaleHandleError, match="closed"):
        x86.load_linux(vm, vcpu, bzimage())


@pytest.mark.parametrize("kernel", [0, None, [1, 2], 1.5])
def test_a_kernel_of_the_wrong_type_is_a_type_error(machine, kernel):
    vm, vcpu = machine
    assert "path or bytes" in refused(TypeError, vm, vcpu, kernel)


@pytest.mark.parametrize("vm_or_vcpu", ["vm", "vcpu"])
def test_a_vm_or_vcpu_of_the_wrong_type_is_a_type_error(machine, vm_or_vcpu):
    vm, vcpu = machine
    args = (None, vcpu) if vm_or_vcpu == "vm" else (vm, object())
    with pytest.raises(TypeError, match="x86 VM and vCPU"):
        x86.load_linux(*args, bzimage())


def test_a_cmdline_of_the_wrong_type_or_with_a_nul_is_refused(machine):
    vm, vcpu = machine
    assert "str or bytes" in refused(TypeError, vm, vcpu, bzimage(), 42)
    assert "NUL" in refused(BootError, vm, vcpu, bzimage(), "console=ttyS0\0 init=/bin/sh")
    assert "at most 2047" in refused(BootError, vm, vcpu, bzimage(), "x" * 2048)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_an_unreadable_initrd_passes_oserror_through_and_leaks_no_fd(small_machine, tmp_path):
    vm, vcpu = small_machine
    fds = open_fds()
    for path in (tmp_path, tmp_path / "missing.img"):
        for _ in range(20):
            refused(OSError, vm, vcpu, bzimage(), initrd=path)
            refused(OSError, vm, vcpu, path)
    assert open_fds() == fds
    assert "path or bytes" in refused(TypeError, vm, vcpu, bzimage(), initrd=7)


@pytest.mark.parametrize("bits", [16, 0, "64", True, 64.0, None])
def test_bits_other_than_the_int_32_or_64_is_a_value_error(machine, bits):
    # Found: 64.0 was taken (and reported back as bits=64.0).
    vm, vcpu = machine
    assert "64 or 32" in refused(ValueError, vm, vcpu, bzimage(), bits=bits)


@pytest.mark.parametrize("reserved", [
    [(-1, 0x1000)], [(0xA0000, 0)], [(0xA0000, -5)], [((1 << 64) - 0x1000, 0x2000)],
    [(0xA0000,)], [(0xA0000, 0x1000, 2)], [0xA0000], (0xA0000, 0x60000), [("a", "b")],
    [(0xA0000, 4096.0)],
])
def test_malformed_reserved_ranges_are_value_errors(machine, reserved):
    # Found: a bare pair instead of a list of pairs, or a triple, gave Python's unpacking
    # message ("cannot unpack non-iterable int object").
    vm, vcpu = machine
    assert "reserved" in refused(ValueError, vm, vcpu, bzimage(), reserved=reserved)


def assert_clean_e820(e820) -> None:
    """Sorted, non-empty entries, no two overlapping."""
    assert all(e.size > 0 for e in e820)
    assert all(a.addr + a.size <= b.addr for a, b in zip(e820, e820[1:])), e820


def test_overlapping_reserved_ranges_become_one_entry(machine):
    # Found: each range became its own entry, overlapping the other.
    vm, vcpu = machine
    boot = x86.load_linux(vm, vcpu, bzimage(),
                          reserved=[x86.LEGACY_HOLE, (0xB0000, 0x1000), (0xF0000, 0x20000)])
    assert_clean_e820(boot.e820)
    assert [e for e in boot.e820 if e.type == x86.E820Type.RESERVED] == \
        [x86.E820Entry(0xA0000, 0x70000, x86.E820Type.RESERVED)]


def test_a_rom_slot_inside_the_legacy_hole_does_not_double_the_hole(kvm):
    with kvm.create_vm() as vm:
        vm.set_tss_addr(0xFFFBD000)
        vm.add_memory(0, 0xA0000)
        vm.add_memory(0xF0000, 0x10000, readonly=True)
        vm.add_memory(0x100000, RAM - 0x100000)
        vcpu = vm.create_vcpu(0)
        x86.set_supported_cpuid(vcpu)
        boot = x86.load_linux(vm, vcpu, bzimage())
        assert_clean_e820(boot.e820)
        assert x86.E820Entry(0xA0000, 0x60000, x86.E820Type.RESERVED) in boot.e820


def vm_with(kvm, slots, readonly=()):
    vm = kvm.create_vm()
    vm.set_tss_addr(0xFFFBD000)
    for addr, size in slots:
        vm.add_memory(addr, size)
    for addr, size in readonly:
        vm.add_memory(addr, size, readonly=True)
    vcpu = vm.create_vcpu(0)
    x86.set_supported_cpuid(vcpu)
    return vm, vcpu


def test_ram_that_misses_low_memory_is_refused(kvm):
    vm, vcpu = vm_with(kvm, [(0x100000, RAM)])
    with vm:
        assert "low-memory tables" in refused(BootError, vm, vcpu, bzimage())
    vm, vcpu = vm_with(kvm, [(0, 0x8000), (0x100000, RAM)])     # boot_params fits, stack not
    with vm:
        assert "0x8000" in refused(BootError, vm, vcpu, bzimage())


def test_only_read_only_slots_is_no_ram(kvm):
    vm, vcpu = vm_with(kvm, [], readonly=[(0, RAM)])
    with vm:
        assert "no RAM" in refused(BootError, vm, vcpu, bzimage())


def test_more_e820_entries_than_boot_params_holds_is_refused(machine):
    vm, vcpu = machine
    holes = [(0x2000000 - (i + 1) * 0x2000, 0x1000) for i in range(64)]   # 64 holes, 129 entries
    assert "e820 entries" in refused(BootError, vm, vcpu, bzimage(), reserved=holes)
    boot = x86.load_linux(vm, vcpu, bzimage(), reserved=holes[:63])      # 127 entries: fits
    assert len(boot.e820) == 127
    assert vm.memory.read_int(BOOT_PARAMS + 0x1E8, 1) == 127               # e820_entries


def test_adjacent_ram_slots_merge_into_one_e820_entry(kvm):
    slots = [(0, 0xA0000)] + [(0x100000 + i * MiB, MiB) for i in range(31)]
    vm, vcpu = vm_with(kvm, slots)
    with vm:
        boot = x86.load_linux(vm, vcpu, bzimage())
        ram = [e for e in boot.e820 if e.type == x86.E820Type.RAM]
        assert ram == [x86.E820Entry(0, 0xA0000, x86.E820Type.RAM),
                       x86.E820Entry(0x100000, 31 * MiB, x86.E820Type.RAM)]
        assert boot.kernel.end - boot.kernel.addr == 4 * MiB   # across several slots


def test_an_initrd_that_fits_only_below_the_kernel_goes_there(machine):
    vm, vcpu = machine
    image = bzimage()                    # kernel at 16 MiB, 4 MiB: 12 MiB above, 15 MiB below
    initrd = bytes(range(256)) * (14 * MiB // 256)
    boot = x86.load_linux(vm, vcpu, image, initrd=initrd)
    assert boot.initrd.end <= boot.kernel.addr == 16 * MiB
    check_placement(vm, vcpu, boot, image, initrd)


def test_an_initrd_larger_than_ram_is_refused_naming_its_size(machine):
    vm, vcpu = machine
    assert f"({RAM + 1} bytes)" in refused(BootError, vm, vcpu, bzimage(), initrd=bytes(RAM + 1))


# -- 3. resources ---------------------------------------------------------------------------

def maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def test_repeated_loads_on_fresh_vms_leak_no_fd_or_mapping(kvm, tmp_path):
    kernel, initrd = tmp_path / "bzImage", tmp_path / "initrd"
    kernel.write_bytes(bzimage())
    initrd.write_bytes(b"\7" * 65536)

    def one() -> None:
        vm, vcpu = vm_with(kvm, [(0, RAM)])
        with vm:
            x86.load_linux(vm, vcpu, kernel, "console=ttyS0", initrd)
            with pytest.raises(BootError):
                x86.load_linux(vm, vcpu, kernel, initrd=bytes(RAM))
    for _ in range(3):                     # the steady state
        one()
    fds, mappings = open_fds(), maps()
    for _ in range(30):
        one()
    assert open_fds() == fds
    assert maps() <= mappings + 4


# -- 4. loading again -------------------------------------------------------------------------

def run_to_marker(vcpu) -> int:
    exit = vcpu.run()
    assert isinstance(exit, IoExit) and exit.port == PORT, exit
    return exit.data[0]


@pytest.mark.parametrize("first, second", [(64, 64), (32, 64), (64, 32), (32, 32)])
def test_a_second_load_wins_and_the_vcpu_enters_the_second_kernel(machine, first, second):
    # Found (64 then 32): the 32-bit entry kept paging and long mode on from the first load.
    vm, vcpu = machine
    x86.load_linux(vm, vcpu, bzimage(marker=0x41), "first", b"\1" * 8192, bits=first)
    image = bzimage(marker=0x42, pref_address=0x800000)
    boot = x86.load_linux(vm, vcpu, image, "second", bits=second)
    check_placement(vm, vcpu, boot, image, None)
    sregs = vcpu.get_sregs()
    assert bool(sregs.efer & x86.EFER_LMA) == (second == 64)
    assert vm.memory.read(boot.cmdline.addr, boot.cmdline.size) == b"second\0"
    assert vm.memory.read_int(BOOT_PARAMS + 0x218, 4) == 0        # no initrd this time
    assert run_to_marker(vcpu) == 0x42


def test_an_elf_kernel_runs_from_its_entry(machine):
    vm, vcpu = machine
    x86.load_linux(vm, vcpu, elf(marker=0x45))
    assert run_to_marker(vcpu) == 0x45
