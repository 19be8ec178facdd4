"""Copies between guest memory and host buffers or files: read, readinto, write, load.

Each copy moves each byte once, across adjacent regions too, and a range any byte of
which no region backs raises GuestMemoryError and touches nothing.
"""

from __future__ import annotations

import array
import ctypes
import gzip
import io
import mmap
import os
import tracemalloc

import pytest

from kvm_bindings import GuestMemoryError

MiB = 1 << 20
# The vm fixture has 64 KiB at GPA 0; these tests add two more pages right after it, so
# 0x0..0x12000 is backed by three adjacent regions and 0x12000 is the first unbacked GPA.
END = 0x12000


@pytest.fixture
def mem(vm):
    """The vm's memory over three adjacent regions, each page filled with its own byte."""
    vm.add_memory(0x10000, 0x1000)
    vm.add_memory(0x11000, 0x1000)
    vm.memory.write(0, _pattern(END))
    return vm.memory


def _pattern(n: int, start: int = 0) -> bytes:
    """Bytes that differ from page to page and within a page, so a misplaced copy shows."""
    return bytes((i // 0x1000 * 7 + i) % 251 for i in range(start, start + n))


def test_read_spans_three_regions_in_order(mem):
    assert mem.read(0xFF00, 0x1200) == _pattern(0x1200, 0xFF00)


@pytest.mark.parametrize("kind", ["bytearray", "memoryview", "mmap", "ctypes", "array"])
def test_readinto_fills_any_writable_buffer_across_regions(mem, kind):
    size = 0x1200
    buffer: object = {"bytearray": lambda: bytearray(size),
                      "memoryview": lambda: memoryview(bytearray(size)),
                      "mmap": lambda: mmap.mmap(-1, size),
                      "ctypes": lambda: (ctypes.c_uint8 * size)(),
                      "array": lambda: array.array("I", bytes(size))}[kind]()
    assert mem.readinto(0xFF00, buffer) == size
    assert bytes(memoryview(buffer).cast("B")) == _pattern(size, 0xFF00)


def test_readinto_a_slice_fills_that_slice_only(mem):
    buffer = bytearray(b"\xee" * 16)
    assert mem.readinto(0xFFFC, memoryview(buffer)[4:12]) == 8
    assert buffer == b"\xee" * 4 + _pattern(8, 0xFFFC) + b"\xee" * 4


def test_readinto_leaves_the_buffer_resizable(mem):
    buffer = bytearray(8)
    mem.readinto(0, buffer)
    buffer.extend(b"more")        # BufferError if readinto kept an export of it
    assert len(buffer) == 12


def test_readinto_refuses_what_it_cannot_write_into(mem):
    with pytest.raises(TypeError, match="read-only"):
        mem.readinto(0, b"\0" * 4)
    with pytest.raises(TypeError, match="not str"):
        mem.readinto(0, "abcd")
    strided = bytearray(b"\xee" * 8)
    with pytest.raises(TypeError, match="contiguous"):
        mem.readinto(0, memoryview(strided)[::2])
    assert strided == b"\xee" * 8
    with pytest.raises(TypeError, match="gpa"):
        mem.readinto("0", bytearray(4))


def test_empty_copies_are_empty(mem):
    assert mem.read(END, 0) == b""
    assert mem.readinto(END, bytearray()) == 0
    mem.write(END, b"")
    assert mem.load(END, io.BytesIO()) == 0


def test_readinto_of_an_unbacked_tail_raises_and_fills_nothing(mem):
    buffer = bytearray(b"\xee" * 0x20)
    with pytest.raises(GuestMemoryError, match="0x12000 is outside every memory region"):
        mem.readinto(END - 0x10, buffer)
    assert buffer == b"\xee" * 0x20


def test_write_spans_three_regions_from_any_buffer(mem):
    data = array.array("I", range(0x1200 // 4))        # not bytes: 4-byte items, as bytes
    mem.write(0xFF00, data)
    assert mem.read(0xFF00, 0x1200) == data.tobytes()
    mem.write(0x10FFE, memoryview(b"wxyz"))             # across the second boundary
    raw = data.tobytes()
    assert mem.read(0x10FFC, 8) == raw[0x10FC:0x10FE] + b"wxyz" + raw[0x1102:0x1104]


def test_write_of_an_unbacked_tail_raises_and_writes_nothing(mem):
    before = mem.read(0, END)
    with pytest.raises(GuestMemoryError):
        mem.write(0xFFF0, bytes(0x2020))        # three regions, then 0x10 bytes of nothing
    assert mem.read(0, END) == before
    with pytest.raises(TypeError, match="not str"):
        mem.write(0, "text")


def test_read_int_within_and_across_regions(mem):
    mem.write(0xFFFC, (0x1122334455667788).to_bytes(8, "little"))
    assert mem.read_int(0xFFFC, 8) == 0x1122334455667788     # across
    assert mem.read_int(0xFFFC, 4) == 0x55667788             # within
    with pytest.raises(GuestMemoryError):
        mem.read_int(END - 2, 4)


def test_load_from_a_path_spans_regions(mem, tmp_path):
    path = tmp_path / "image"
    path.write_bytes(_pattern(0x1200, 5))
    assert mem.load(0xFF00, path) == 0x1200
    assert mem.load(0xFF00, str(path)) == 0x1200
    assert mem.read(0xFF00, 0x1200) == _pattern(0x1200, 5)


@pytest.mark.parametrize("opener", ["buffered", "unbuffered", "bytesio"])
def test_load_from_a_file_object_takes_the_rest_from_its_position(mem, tmp_path, opener):
    data = _pattern(0x1200, 9)
    path = tmp_path / "image"
    path.write_bytes(data)
    f = {"buffered": lambda: open(path, "rb"), "unbuffered": lambda: open(path, "rb", buffering=0),
         "bytesio": lambda: io.BytesIO(data)}[opener]()
    with f:
        f.read(0x100)                 # a buffered reader now holds more than it returned
        assert mem.load(0xFF00, f) == 0x1100
        assert f.read() == b""
    assert mem.read(0xFF00, 0x1100) == data[0x100:]


def test_load_from_a_pipe_reads_it_to_the_end(mem):
    r, w = os.pipe()
    with open(r, "rb") as reader:
        with open(w, "wb") as writer:
            writer.write(b"piped")
        assert mem.load(0xFFFE, reader) == 5
    assert mem.read(0xFFFE, 5) == b"piped"


def test_load_from_a_wrapper_loads_what_it_reads_not_what_its_fileno_holds(mem, tmp_path):
    data = _pattern(0x1200, 3)
    path = tmp_path / "image.gz"
    with gzip.open(path, "wb") as f:
        f.write(data)
    assert path.stat().st_size < len(data)       # a wrapper whose fileno() is smaller
    with gzip.open(path, "rb") as f:
        assert mem.load(0xFF00, f) == 0x1200
    assert mem.read(0xFF00, 0x1200) == data


@pytest.mark.parametrize("how", ["path", "file object", "bytesio"])
def test_load_of_a_file_larger_than_memory_raises_and_reads_nothing(mem, tmp_path, how):
    before = mem.read(0, END)
    path = tmp_path / "big"
    path.write_bytes(b"\xaa" * 0x2020)          # from 0xfff0: 0x10 bytes past the last region
    if how == "path":
        with pytest.raises(GuestMemoryError, match="0x12000 is outside"):
            mem.load(0xFFF0, path)
    else:
        with open(path, "rb") if how == "file object" else io.BytesIO(path.read_bytes()) as f:
            with pytest.raises(GuestMemoryError, match="0x12000 is outside"):
                mem.load(0xFFF0, f)
            assert f.tell() == 0                # not a byte read from it
    assert mem.read(0, END) == before


def test_load_refuses_what_is_not_a_binary_file(mem, tmp_path):
    with pytest.raises(TypeError, match="binary file object"):
        mem.load(0, io.StringIO("text"))
    with pytest.raises(TypeError, match="binary file object"):
        mem.load(0, 42)


# Whether a copy is single shows in the peak of Python allocations (tracemalloc sees
# bytes objects, not the mmap'd guest memory): a read that copied each region out and
# then joined the pieces would peak at twice its size.

@pytest.fixture
def big(kvm):
    """A VM with 64 MiB of memory at GPA 0, in two adjacent 32 MiB regions."""
    with kvm.create_vm() as vm:
        vm.add_memory(0, 32 * MiB)
        vm.add_memory(32 * MiB, 32 * MiB)
        yield vm.memory


def _peak(call):
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_read_across_regions_allocates_its_result_once(big):
    data, peak = _peak(lambda: big.read(0, 64 * MiB))
    assert len(data) == 64 * MiB
    assert peak < 64 * MiB * 1.5


def test_readinto_allocates_nothing_the_size_of_the_data(big):
    buffer = mmap.mmap(-1, 64 * MiB)
    count, peak = _peak(lambda: big.readinto(0, buffer))
    assert count == 64 * MiB
    assert peak < 1 * MiB


@pytest.mark.parametrize("how", ["path", "file object"])
def test_load_reads_the_file_straight_into_guest_memory(big, tmp_path, how):
    path = tmp_path / "image"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(64 * MiB - 4)
        f.write(b"tail")
    if how == "path":
        count, peak = _peak(lambda: big.load(0, path))
    else:
        with open(path, "rb") as f:
            count, peak = _peak(lambda: big.load(0, f))
    assert count == 64 * MiB
    assert peak < 1 * MiB
    assert big.read(64 * MiB - 4, 4) == b"tail"



class _RemoveOnRelease:
    """A GuestMemory's lock that, once armed, removes a region as soon as a caller lets go
    of it: the moment a copy has checked its range, before it has copied anything."""

    def __init__(self, lock, remove):
        self.lock, self.remove, self.armed = lock, remove, False

    def __enter__(self):
        self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()
        if self.armed:
            self.armed = False
            self.remove()


@pytest.mark.parametrize("op", ["read", "readinto", "write"])
def test_a_region_removed_once_a_copy_has_checked_its_range_is_still_copied_whole(kvm, op):
    with kvm.create_vm() as vm:
        vm.add_memory(0, 0x1000)
        region = vm.add_memory(0x1000, 0x1000)
        vm.memory.write(0, b"\x11" * 0x1000 + b"\x22" * 0x1000)
        held = region.view()              # to see what a write did after the region went
        lock = vm.memory._lock = _RemoveOnRelease(vm.memory._lock,
                                                  lambda: vm.remove_memory(region))
        lock.armed = True
        if op == "read":
            assert vm.memory.read(0, 0x2000) == b"\x11" * 0x1000 + b"\x22" * 0x1000
        elif op == "readinto":
            buffer = bytearray(0x2000)
            assert vm.memory.readinto(0, buffer) == 0x2000
            assert buffer == b"\x11" * 0x1000 + b"\x22" * 0x1000
        else:
            vm.memory.write(0, b"\x33" * 0x2000)
            assert held.tobytes() == b"\x33" * 0x1000
        assert region.removed and not lock.armed           # it went mid-copy
        with pytest.raises(GuestMemoryError):
            vm.memory.read(0, 0x2000)
