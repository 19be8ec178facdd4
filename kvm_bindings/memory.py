"""Guest memory: host mappings (backings) registered as KVM memory slots, addressed by GPA."""

from __future__ import annotations

import bisect
import heapq
import io
import os
import stat
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

from ._fd import FdObject, Unshareable
from .backing import PAGE_SIZE, Backing, _index, _writable_bytes
from .errors import GuestMemoryError, StaleHandleError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["PAGE_SIZE", "GuestMemfd", "GuestMemory", "MemoryRegion", "SlotTable"]

class MemoryRegion(Unshareable):
    """One memory slot: part of a Backing and where the guest sees it.

    slot, guest_phys_addr, size and flags are what KVM was given
    (struct kvm_userspace_memory_region / kvm_userspace_memory_region2); the slot maps
    backing from offset, at host_addr. The region is a handle: once removed (or its VM
    closed) every call taking it raises StaleHandleError, and so does passing it to
    another VM. Its backing stays as it was, unless add_memory mapped it for this region
    alone: then it is unmapped with the slot.
    """

    __slots__ = ("slot", "guest_phys_addr", "size", "flags", "host_addr", "backing", "offset",
                 "guest_memfd", "guest_memfd_offset", "_view", "_owns_backing", "_owner",
                 "__weakref__")

    def __init__(self, slot: int, guest_phys_addr: int, size: int, flags: int, backing: Backing,
                 offset: int = 0, guest_memfd: Any = None, guest_memfd_offset: int = 0, *,
                 owner: Any = None, owns_backing: bool = False,
                 replacing: MemoryRegion | None = None) -> None:
        self.slot = slot
        self.guest_phys_addr = guest_phys_addr
        self.size = size
        self.flags = flags
        self.backing = backing
        self.offset = offset
        self._owns_backing = owns_backing
        self._view: memoryview | None = None
        backing._attach(self, replacing)    # from here the backing cannot be unmapped under us
        buffer = backing._buffer
        assert buffer is not None            # attached: the backing is not unmapped yet
        # A region over its whole backing (add_memory's own anonymous memory) views it
        # through the backing's memoryview: no slice of its own, one object less per slot
        # for every full collection to walk. The backing releases that view when it goes.
        whole = offset == 0 and size == buffer.nbytes
        self._view = buffer if whole else buffer[offset:offset + size]
        self.host_addr = backing.host_addr + offset
        self.guest_memfd = guest_memfd
        self.guest_memfd_offset = guest_memfd_offset
        self._owner: Callable[[], Any] = weakref.ref(owner) if owner is not None else _nobody

    @property
    def end(self) -> int:
        return self.guest_phys_addr + self.size

    @property
    def removed(self) -> bool:
        """True once the slot is deleted (remove_memory, or its VM closed)."""
        return self._view is None

    def view(self) -> memoryview:
        """The whole region, zero-copy. A view you hold keeps the mapping alive after the
        region is removed; the guest no longer reaches it (KVM's slot goes first)."""
        view = self._view
        if view is None:
            raise StaleHandleError(f"{self!r} was removed")
        return view[:]

    def _unmap(self) -> None:
        """Let go of the backing, unmapping it if add_memory mapped it for this region alone;
        only ever after KVM has deleted the slot."""
        view, self._view = self._view, None
        if view is None:
            return
        if view is not self.backing._buffer:     # the backing's own view: it releases that
            try:
                view.release()
            except BufferError:
                pass    # re-exported by a caller (ctypes from_buffer...): the mapping stays
        self.backing._detach(self)
        if self._owns_backing:
            self.backing.close()

    def __repr__(self) -> str:
        state = " removed" if self._view is None else ""
        where = "" if self._owns_backing else f" backing={self.backing.kind}+{self.offset:#x}"
        return (f"<MemoryRegion slot={self.slot} gpa={self.guest_phys_addr:#x} "
                f"size={self.size:#x} flags={self.flags:#x}{where}{state}>")


def _nobody() -> None:
    return None


class GuestMemory(Unshareable):
    """Every memory region of a VM, addressed by guest-physical address (GPA).

    Reads and writes may span adjacent regions; a range any byte of which no
    region backs raises GuestMemoryError and touches nothing.
    """

    def __init__(self) -> None:
        # Two parallel lists, sorted by start; the lock keeps them paired for readers in
        # other threads while a region is added or removed.
        self._starts: list[int] = []
        self._regions: list[MemoryRegion] = []
        self._lock = threading.Lock()

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        with self._lock:
            return tuple(self._regions)

    def _add(self, region: MemoryRegion) -> None:
        with self._lock:
            i = bisect.bisect(self._starts, region.guest_phys_addr)
            self._starts.insert(i, region.guest_phys_addr)
            self._regions.insert(i, region)

    def _remove(self, region: MemoryRegion) -> None:
        with self._lock:
            i = self._find(region)
            del self._starts[i], self._regions[i]

    def _replace(self, old: MemoryRegion, new: MemoryRegion) -> None:
        """new in old's place (the same GPA range), in one step for readers in other threads."""
        with self._lock:
            self._regions[self._find(old)] = new

    def _find(self, region: MemoryRegion) -> int:
        i = bisect.bisect(self._starts, region.guest_phys_addr) - 1
        if i < 0 or self._regions[i] is not region:
            i = self._regions.index(region)
        return i

    def overlapping(self, gpa: int, size: int) -> MemoryRegion | None:
        """The region overlapping gpa..gpa+size, if any."""
        gpa, size = _index(gpa, "gpa"), _index(size, "size")
        with self._lock:
            # Regions never overlap, so sorted by start they are sorted by end too: only the
            # last region starting before gpa + size can reach into the range.
            i = bisect.bisect_left(self._starts, gpa + size) - 1
            if i >= 0 and gpa < self._regions[i].end:
                return self._regions[i]
            return None

    def region_at(self, gpa: int) -> MemoryRegion | None:
        """The region backing gpa, if any."""
        gpa = _index(gpa, "gpa")
        with self._lock:
            return self._region_at(gpa)

    def _region_at(self, gpa: int) -> MemoryRegion | None:
        i = bisect.bisect(self._starts, gpa) - 1
        if i >= 0 and gpa < self._regions[i].end:
            return self._regions[i]
        return None

    def _pieces(self, gpa: int, size: int) -> list[tuple[MemoryRegion, int, int]]:
        """(region, offset in it, length) covering gpa..gpa+size in order; GuestMemoryError,
        before anything is touched, if any byte of it is outside every region."""
        gpa, size = _index(gpa, "gpa"), _index(size, "size")
        with self._lock:
            return self._pieces_locked(gpa, size)

    def _pieces_locked(self, gpa: int, size: int) -> list[tuple[MemoryRegion, int, int]]:
        if gpa < 0 or size < 0:
            raise GuestMemoryError(f"negative GPA or size ({gpa:#x}, {size})")
        out, cur, end = [], gpa, gpa + size
        while cur < end:
            r = self._region_at(cur)
            if r is None:
                raise GuestMemoryError(
                    f"GPA range {gpa:#x}..{end:#x} is not fully backed by guest memory: "
                    f"{cur:#x} is outside every memory region ({self._describe()})")
            n = min(end, r.end) - cur
            out.append((r, cur - r.guest_phys_addr, n))
            cur += n
        return out

    def _spans(self, gpa: object, size: object) -> list[memoryview]:
        """Views of guest memory covering gpa..gpa+size, in order, one per region crossed.

        The whole range is checked before any view is made, and the views are made under the
        lock: each holds its mapping, so a region removed meanwhile cannot be unmapped under
        a copy in progress (the guest no longer sees it; the copy finishes in old memory).
        """
        gpa, size = _index(gpa, "gpa"), _index(size, "size")
        with self._lock:
            spans = []
            for r, off, n in self._pieces_locked(gpa, size):
                view = r._view
                if view is None:        # only a region whose slot KVM would not delete
                    raise StaleHandleError(f"{r!r} was removed")
                spans.append(view[off:off + n])
            return spans

    def _describe(self) -> str:
        if not self._regions:
            return "the VM has no memory; add some with vm.add_memory()"
        return "regions: " + ", ".join(f"{r.guest_phys_addr:#x}..{r.end:#x}" for r in self._regions)

    def read(self, gpa: int, size: int) -> bytes:
        """size bytes of guest memory from gpa, copied once (across regions too)."""
        # bytes.join takes buffers: it sizes the result once and copies each span into it.
        return b"".join(self._spans(gpa, size))

    def readinto(self, gpa: int, buffer: WriteableBuffer) -> int:
        """Fill a caller's writable, contiguous buffer (bytearray, mmap, memoryview, ctypes
        array...) with guest memory from gpa, copied once; return the bytes copied, its size.

        Nothing is copied if any byte of the range is outside guest memory.
        """
        with _writable_bytes(buffer, "readinto()", "a bytearray, an mmap, a memoryview...") as dest:
            pos = 0
            for span in self._spans(gpa, dest.nbytes):
                n = span.nbytes
                dest[pos:pos + n] = span
                pos += n
            return pos

    def write(self, gpa: int, data: ReadableBuffer) -> None:
        """Copy data (any contiguous buffer) into guest memory at gpa, once (across regions
        too); nothing is written if any byte of the range is outside guest memory."""
        try:
            whole = memoryview(data)
        except TypeError:
            raise TypeError(f"write() takes bytes or another buffer, not "
                            f"{type(data).__name__}") from None
        with whole:
            if not whole.c_contiguous:
                raise TypeError("write() needs a contiguous buffer")
            with whole.cast("B") as src:
                pos = 0
                for span in self._spans(gpa, src.nbytes):   # the whole range checked first
                    n = span.nbytes
                    span[:] = src[pos:pos + n]
                    pos += n

    def view(self, gpa: int, size: int) -> memoryview:
        """A zero-copy, writable view of guest memory; the range must lie in one region."""
        spans = self._spans(gpa, size)
        if not spans:
            return memoryview(bytearray())        # an empty range: nothing to view
        if len(spans) > 1:
            raise GuestMemoryError(f"GPA range {gpa:#x}..{gpa + size:#x} spans memory regions; "
                                   f"use read()/write(), which copy")
        return spans[0]

    def read_int(self, gpa: int, size: int) -> int:
        spans = self._spans(gpa, size)
        if len(spans) == 1:
            return int.from_bytes(spans[0], "little")     # straight from guest memory
        return int.from_bytes(b"".join(spans), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        """Write value as size little-endian bytes (negative values as two's complement);
        OverflowError if it does not fit in size bytes, rather than a silent truncation."""
        value, size = _index(value, "value"), _index(size, "size")
        try:
            data = value.to_bytes(size, "little", signed=value < 0)
        except OverflowError:
            raise OverflowError(f"value={value:#x} does not fit in {size} bytes") from None
        self.write(gpa, data)

    def load(self, gpa: int, source: str | os.PathLike[str] | BinaryIO) -> int:
        """Copy a file (a path, or a binary file object from its current position) into guest
        memory at gpa; return the bytes loaded.

        A regular file (a path, or a file object open() made) or a BytesIO is read straight
        into guest memory, each byte copied once; its size is known first, so if any byte
        would land outside guest memory GuestMemoryError is raised and nothing is read or
        written. Any other file object (a pipe, a gzip file...) is read to its end first,
        then written, touching nothing if it does not fit.
        """
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb", buffering=0) as f:   # unbuffered: read() lands in place
                return self._load(gpa, f)
        if not hasattr(source, "read") or isinstance(source, io.TextIOBase):
            raise TypeError(f"load() takes a path or a binary file object, not "
                            f"{type(source).__name__}")
        return self._load(gpa, source)

    def _load(self, gpa: int, f: BinaryIO) -> int:
        readinto = getattr(f, "readinto", None)
        size = None if readinto is None else _remaining(f)
        if readinto is None or size is None:    # a stream of unknown length: read, then write
            data = f.read()
            self.write(gpa, data)
            return len(data)
        loaded = 0
        for span in self._spans(gpa, size):     # the whole range checked before reading
            n, pos = span.nbytes, 0
            while pos < n:
                got = readinto(span[pos:])
                if not got:
                    return loaded + pos     # the file shrank while we read it
                pos += got
            loaded += n
        return loaded

    def host_address(self, gpa: int) -> int:
        r, off, _ = self._pieces(gpa, 1)[0]
        return r.host_addr + off


def _remaining(f: BinaryIO) -> int | None:
    """How many bytes f has from its position to its end, where that is known without
    reading them: a regular file open() made (by fstat), or a BytesIO. None for anything
    else: a pipe, or a wrapper (gzip...) whose fileno() is not where its bytes come from."""
    if isinstance(f, io.BytesIO):
        return max(len(f.getbuffer()) - f.tell(), 0)
    if not isinstance(f, (io.FileIO, io.BufferedReader, io.BufferedRandom)):
        return None
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        return max(st.st_size - f.tell(), 0)
    except OSError:
        return None


class SlotTable:
    """Which memory slot numbers are in use, and the lowest free one, in O(log n).

    Freed numbers go on a heap; numbers never used yet come from a counter. A number
    taken explicitly may still sit on the heap: it is dropped when it reaches the top.
    """

    def __init__(self) -> None:
        self._by_slot: dict[int, MemoryRegion] = {}
        self._free: list[int] = []
        self._next = 0

    def get(self, slot: int) -> MemoryRegion | None:
        return self._by_slot.get(slot)

    def lowest_free(self) -> int:
        while self._free and self._free[0] in self._by_slot:
            heapq.heappop(self._free)
        return self._free[0] if self._free else self._next

    def claim(self, slot: int, region: MemoryRegion) -> None:
        if slot >= self._next and slot <= 0xFFFF:        # address space 0 only
            for unused in range(self._next, slot):
                heapq.heappush(self._free, unused)
            self._next = slot + 1
        self._by_slot[slot] = region

    def replace(self, slot: int, region: MemoryRegion) -> None:
        """region takes over slot, which stays in use."""
        self._by_slot[slot] = region

    def release(self, slot: int) -> None:
        del self._by_slot[slot]
        if slot <= 0xFFFF:
            heapq.heappush(self._free, slot)


class GuestMemfd(FdObject):
    """A guest_memfd (KVM_CREATE_GUEST_MEMFD): guest-private memory, owned by its VM and
    closed with it. Pass it to vm.add_memory(..., guest_memfd=...) of that VM only."""

    def __init__(self, vm: Any, fd: int, size: int) -> None:
        super().__init__(fd)
        self.vm = vm
        self.size = size

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<GuestMemfd {state} size={self.size:#x}>"
