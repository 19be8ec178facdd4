"""Dirty-page tracking results: the bitmap KVM_GET_DIRTY_LOG fills, and the dirty ring's entries.

KVM's bitmap holds one bit per page of a slot, little-endian bit order (the kernel's
set_bit_le: page p is bit p % 8 of byte p // 8), in 64-bit words. A DirtyBitmap is that
buffer itself, read as the set of dirty pages' GPAs. Every scan here skips all-clear and
all-set stretches with memory compares (bytearray.startswith) in doubling steps, so a slot
of millions of pages that is all clean or all dirty costs a few dozen calls, and mixed
stretches are counted in bulk rather than bit by bit.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Iterator
from itertools import chain
from typing import TYPE_CHECKING, Any, NoReturn

from . import abi
from .backing import PAGE_SIZE

if TYPE_CHECKING:
    from .memory import MemoryRegion

__all__ = ["DirtyBitmap"]

_WORD = 8                       # bytes per word of KVM's bitmap (an unsigned long, 64-bit arches)
_ALL = (1 << 64) - 1
_BLOCK = 1 << 16                # the longest stretch one compare covers
_ZERO_BYTES = bytes(_BLOCK)
_ONE_BYTES = b"\xff" * _BLOCK
# Views of 8, 16, 32 ... _BLOCK bytes: a compare of any of those lengths copies nothing.
_ZEROS = tuple(memoryview(_ZERO_BYTES)[:_WORD << k] for k in range((_BLOCK // _WORD).bit_length()))
_ONES = tuple(memoryview(_ONE_BYTES)[:_WORD << k] for k in range((_BLOCK // _WORD).bit_length()))
_CHUNK = 4096                   # bytes of mixed words counted in one go by __len__


def _skip(startswith: Any, pos: int, end: int, blocks: tuple[memoryview, ...]) -> int:
    """The first word offset in [pos, end) (byte offsets, whole words) whose bytes differ
    from blocks' (all 0 or all 0xff), or end: compares that double in length, then halve."""
    k = 0
    top = len(blocks) - 1
    while True:
        size = _WORD << k
        if pos + size > end or not startswith(blocks[k], pos):
            break
        pos += size
        if k < top:
            k += 1
    # Fewer than 2**k matching words follow pos: add the largest steps that still match.
    k -= 1
    while k >= 0:
        size = _WORD << k
        if pos + size <= end and startswith(blocks[k], pos):
            pos += size
        k -= 1
    return pos


def _bitmap_bytes(pages: int) -> int:
    """The size KVM gives a slot's bitmap: whole 64-bit words (kvm_dirty_bitmap_bytes)."""
    return (pages + 63) // 64 * _WORD


class DirtyBitmap(bytearray):
    """The dirty log of a memory slot: KVM's bitmap (one bit per page), read as a set of GPAs.

    The object is the buffer KVM_GET_DIRTY_LOG filled (the buffer protocol gives its bytes:
    memoryview(bitmap), bytes(bitmap), a file's write()). len() is the number of dirty
    pages; iterating yields their GPAs in order; `gpa in bitmap` says whether the page
    holding gpa is dirty; runs() yields (gpa, pages) per run of consecutive dirty pages.
    base is the GPA of the first page, pages the number of pages it covers, region the
    MemoryRegion it was read from (None for one built by hand). vm.clear_dirty_log(region,
    bitmap) re-protects exactly the pages set in it. Its bytes are writable (through a
    memoryview) but its size is fixed; index its bytes through memoryview(bitmap).

    DirtyBitmap(data, base=0, pages=None) copies a bitmap in KVM's layout: whole 64-bit
    words, no bit set past the last page (pages defaults to every bit of data).
    """

    __slots__ = ("base", "pages", "region")

    base: int
    pages: int
    region: MemoryRegion | None

    def __init__(self, data: Any = b"", base: int = 0, pages: int | None = None) -> None:
        view = memoryview(data)
        with view:
            nbytes = view.nbytes
            super().__init__(view)
        if pages is None:
            pages = nbytes * 8
        if not isinstance(pages, int) or isinstance(pages, bool) or pages < 0:
            raise TypeError(f"pages must be a count of pages (an int >= 0), not {pages!r}")
        if not isinstance(base, int) or isinstance(base, bool) or base < 0 or base % PAGE_SIZE:
            raise ValueError(f"base must be a page-aligned GPA, not {base!r}")
        if nbytes != _bitmap_bytes(pages):
            raise ValueError(f"a bitmap of {pages} pages is {_bitmap_bytes(pages)} bytes "
                             f"(whole 64-bit words), not {nbytes}")
        self.base, self.pages, self.region = base, pages, None
        if pages % 64 and self._words()[-1] >> pages % 64:
            raise ValueError(f"bits past the last page ({pages - 1}) are set")

    @classmethod
    def _for_slot(cls, region: MemoryRegion) -> DirtyBitmap:
        """A zeroed bitmap the size of region's slot, for KVM to fill."""
        self = cls.__new__(cls)
        pages = region.size // PAGE_SIZE
        bytearray.__init__(self, _bitmap_bytes(pages))
        self.base, self.pages, self.region = region.guest_phys_addr, pages, region
        return self

    def _words(self) -> memoryview:
        view = memoryview(self)
        if view.nbytes != _bitmap_bytes(self.pages):
            # Only bytearray's own resizing calls (append, extend...) get here.
            raise ValueError(f"this DirtyBitmap was resized to {view.nbytes} bytes; a bitmap of "
                             f"{self.pages} pages is {_bitmap_bytes(self.pages)}")
        return view.cast("Q")      # native order: little-endian on every arch KVM here runs on

    # -- the set of dirty pages
    def __len__(self) -> int:
        """The number of dirty pages (a popcount)."""
        words = self._words()
        data = memoryview(self)
        startswith = self.startswith
        end = (self.pages >> 6) * _WORD
        total = pos = 0
        while pos < end:
            pos = _skip(startswith, pos, end, _ZEROS)
            if pos >= end:
                break
            stop = _skip(startswith, pos, end, _ONES)
            total += (stop - pos) * 8
            if stop >= end:
                break
            pos = min(stop + _CHUNK, end)
            # Zero bytes add nothing: dropping them first makes sparse stretches cheap.
            mixed = data[stop:pos].tobytes().translate(None, b"\0")
            total += int.from_bytes(mixed, "little").bit_count()
        if self.pages & 63:
            total += (words[-1] & ((1 << (self.pages & 63)) - 1)).bit_count()
        return total

    def __bool__(self) -> bool:
        return next(self.runs(), None) is not None

    def __iter__(self) -> Iterator[int]:
        """The GPAs of the dirty pages, in order."""
        return chain.from_iterable(range(gpa, gpa + n * PAGE_SIZE, PAGE_SIZE)
                                   for gpa, n in self.runs())

    def __contains__(self, gpa: object) -> bool:
        """Whether the page holding gpa is dirty (False for a GPA outside the bitmap)."""
        if not isinstance(gpa, int) or isinstance(gpa, bool):
            return False
        page = (gpa - self.base) // PAGE_SIZE
        if not 0 <= page < self.pages:
            return False
        return bool(bytearray.__getitem__(self, page >> 3) >> (page & 7) & 1)

    def runs(self) -> Iterator[tuple[int, int]]:
        """(gpa, pages) for each run of consecutive dirty pages, in order."""
        words = self._words()
        startswith = self.startswith
        full = self.pages >> 6                       # words whose 64 bits are all pages
        end = full * _WORD
        base, nwords = self.base, len(words)
        start = -1                                   # first page of the run open, or -1
        i = 0
        while i < nwords:
            w = words[i]
            if i == full:                            # the last, partial word
                w &= (1 << (self.pages & 63)) - 1
            elif w == 0:
                if start >= 0:
                    yield base + start * PAGE_SIZE, (i << 6) - start
                    start = -1
                i = _skip(startswith, (i + 1) * _WORD, end, _ZEROS) // _WORD
                continue
            elif w == _ALL:
                if start < 0:
                    start = i << 6
                i = _skip(startswith, (i + 1) * _WORD, end, _ONES) // _WORD
                continue
            page = i << 6
            if start >= 0:                           # the open run ends in this word
                ones = (~w & (w + 1)).bit_length() - 1
                yield base + start * PAGE_SIZE, page + ones - start
                start = -1
                w = w >> ones << ones
            while w:
                low = (w & -w).bit_length() - 1
                rest = w >> low
                n = (~rest & (rest + 1)).bit_length() - 1
                if low + n == 64:                    # runs on into the next word
                    start = page + low
                    break
                yield base + (page + low) * PAGE_SIZE, n
                w = rest >> n << (low + n)
            i += 1
        if start >= 0:
            yield base + start * PAGE_SIZE, self.pages - start

    # -- comparisons and copies
    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple)):
            # What get_dirty_log() returned before it was a bitmap: a list of GPAs. Compared
            # as such, so that old code keeps meaning what it meant, rather than being False.
            return list(self) == list(other)
        if not isinstance(other, DirtyBitmap):
            return NotImplemented
        return (self.base, self.pages) == (other.base, other.pages) and bytearray.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None

    def __repr__(self) -> str:
        return (f"<DirtyBitmap: {len(self)} of {self.pages} pages dirty from GPA "
                f"{self.base:#x}>")

    def copy(self) -> DirtyBitmap:
        """A copy of the bitmap (same base, pages and region)."""
        twin = DirtyBitmap(self, self.base, self.pages)
        twin.region = self.region
        return twin

    def __reduce__(self) -> tuple[Any, ...]:
        return DirtyBitmap, (bytes(self), self.base, self.pages)

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return self.__reduce__()

    # -- bytearray calls that would mean something else here
    def _refuse(self, what: str) -> NoReturn:
        raise TypeError(f"a DirtyBitmap is a set of dirty pages, not a byte sequence: {what}; "
                        f"its bytes are memoryview(bitmap), a page's bit is `gpa in bitmap`, "
                        f"and vm.clear_dirty_log(region, bitmap) clears the log")

    def __getitem__(self, key: Any) -> NoReturn:
        self._refuse("no indexing")

    def __setitem__(self, key: Any, value: Any) -> NoReturn:
        self._refuse("no item assignment")

    def __delitem__(self, key: Any) -> NoReturn:
        self._refuse("no deleting")

    def __reversed__(self) -> NoReturn:
        self._refuse("no reversed()")

    def clear(self) -> NoReturn:
        self._refuse("no clear()")

    def pop(self, index: Any = -1) -> NoReturn:
        self._refuse("no pop()")

    def remove(self, value: Any) -> NoReturn:
        self._refuse("no remove()")

    def _address(self) -> tuple[int, Any]:
        """(address, keepalive) of the bytes, for an ioctl to fill; keep the second alive."""
        raw = (ctypes.c_char * len(memoryview(self))).from_buffer(self)
        return ctypes.addressof(raw), raw


def _range_bitmap(pages: range, total: int) -> tuple[int, int, bytearray] | None:
    """KVM_CLEAR_DIRTY_LOG's (first_page, num_pages, bitmap) for a range of page indexes of a
    slot of total pages, or None for an empty range. KVM wants first_page a multiple of 64
    and num_pages one too (unless it ends the slot): the words at either end are widened and
    hold only the range's bits."""
    if pages.step != 1 and len(pages) > 1:
        raise ValueError(f"a range of pages to clear must be consecutive (step 1), not {pages!r}")
    if not len(pages):
        return None
    start, stop = pages[0], pages[-1] + 1
    if start < 0 or stop > total:
        raise ValueError(f"pages {start}..{stop - 1} are not all in the slot: its pages are "
                         f"0..{total - 1}")
    first = start & ~63
    end = min((stop + 63) & ~63, total)
    bitmap = bytearray(b"\xff") * _bitmap_bytes(end - first)
    words = memoryview(bitmap).cast("Q")
    words[0] &= _ALL ^ ((1 << (start - first)) - 1)
    last, keep = divmod(stop - first, 64)
    if keep:
        words[last] &= (1 << keep) - 1
    words.release()
    return first, end - first, bitmap


# -- the dirty ring
_GFN = abi.kvm_dirty_gfn
_GFN_SIZE = ctypes.sizeof(_GFN)
_FLAGS_SIZE: int = vars(_GFN)["flags"].size


def _ints(view: memoryview, size: int) -> memoryview:
    """view's bytes as unsigned ints of size bytes (the kernel's u32 or u64)."""
    if size == 4:
        return view.cast("I")
    assert size == 8
    return view.cast("Q")


def _field_view(ring: memoryview, name: str) -> memoryview:
    """One field of every kvm_dirty_gfn in the ring, as a strided view of ints."""
    field: Any = vars(_GFN)[name]
    assert field.offset % field.size == 0 and _GFN_SIZE % field.size == 0
    return _ints(ring, field.size)[field.offset // field.size::_GFN_SIZE // field.size]


def _harvest_ring(ring: mmap.mmap, first: int, entries: int) -> tuple[list[tuple[int, int]], int]:
    """The dirty ring's published entries from index first on, as [(slot, offset)], each
    marked for reset; and the index to start from next time. Reads the flags of every entry
    in one copy, then slot and offset of those harvested in one copy each."""
    whole = memoryview(ring)
    flags = slots = offsets = None
    try:
        flags, slots, offsets = (_field_view(whole, name) for name in ("flags", "slot", "offset"))
        head = first % entries
        # The kernel publishes an entry by setting DIRTY last; the flags are read before the
        # slot and offset (x86 keeps loads in order).
        order = flags[head:].tobytes() + flags[:head].tobytes()
        count = _prefix(order, _flag_bytes(abi.KVM_DIRTY_GFN_F_DIRTY, entries))
        out: list[tuple[int, int]] = []
        for lo, hi in ((head, min(head + count, entries)), (0, max(head + count - entries, 0))):
            if hi > lo:
                out += zip(slots[lo:hi].tolist(), offsets[lo:hi].tolist())
                flags[lo:hi] = _flag_bytes(abi.KVM_DIRTY_GFN_F_RESET, hi - lo)
        return out, first + count
    finally:
        del flags, slots, offsets
        whole.release()


def _flag_bytes(value: int, n: int) -> memoryview:
    """n flags of this value, as the ring holds them (native order, as cast() reads them)."""
    size = _FLAGS_SIZE
    return _ints(memoryview(value.to_bytes(size, sys.byteorder) * n), size)


def _prefix(data: bytes, pattern: memoryview) -> int:
    """How many leading items of data (in pattern's item size) equal pattern's: a binary
    search of memory compares."""
    size = pattern.itemsize
    raw = pattern.cast("B")
    lo, hi = 0, min(len(data) // size, len(pattern))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if data.startswith(raw[:mid * size]):
            lo = mid
        else:
            hi = mid - 1
    return lo
