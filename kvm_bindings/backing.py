"""Backing: the host memory behind memory slots (anonymous, memfd, file, hugepages, or a
caller's buffer), which one or more slots, in one or more VMs, map at their GPAs."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import io
import mmap
import operator
import os
import stat
import threading
from typing import TYPE_CHECKING, Any

from ._fd import Unshareable, close_unclosed
from .errors import StaleHandleError

if TYPE_CHECKING:
    from .memory import MemoryRegion

__all__ = ["PAGE_SIZE", "Backing"]

PAGE_SIZE = mmap.PAGESIZE
_READ_WRITE = mmap.PROT_READ | mmap.PROT_WRITE
# <asm-generic/mman-common.h>, the value on every arch this package runs on, where Python's
# mmap module does not name it. The page size goes above it as log2(size) <<
# HUGETLB_FLAG_ENCODE_SHIFT, the same shift memfd_create's MFD_HUGE_* use.
_MAP_HUGETLB: int = getattr(mmap, "MAP_HUGETLB", 0x40000)
_HUGE_SHIFT = os.MFD_HUGE_SHIFT
_HUGEPAGES = "/sys/kernel/mm/hugepages"


def _host_address(buffer: mmap.mmap | memoryview) -> int:
    anchor = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor   # release the buffer export at once, so the mapping can be closed later


# The lock over every backing's bookkeeping (which regions use it, whether it is closed):
# one for all, rather than one object more per backing for the collector to walk on every
# full collection (a VM may have 32,764 slots, each with a backing of its own). Held for a
# few statements, never around a call out. Re-entrant: a collection run while this thread
# holds it may close an unreachable backing (its __del__) on the same thread.
_LOCK = threading.RLock()


def _size_name(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def _index(value: object, what: str) -> int:
    """value as an int (anything with a true __index__, not a bool), else a TypeError
    naming it."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, not bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be an integer, not {type(value).__name__}") from None


def _writable_bytes(buffer: Any, call: str, examples: str) -> memoryview:
    """buffer as a flat, writable byte view of its own (release it when done), or a TypeError
    saying what `call` takes instead."""
    try:
        whole = memoryview(buffer)
    except TypeError:
        raise TypeError(f"{call} takes a writable buffer ({examples}), not "
                        f"{type(buffer).__name__}") from None
    with whole:
        if whole.readonly:
            raise TypeError(f"{call} needs a writable buffer; a {type(buffer).__name__} is "
                            f"read-only")
        if not whole.c_contiguous:
            raise TypeError(f"{call} needs a contiguous buffer")
        return whole.cast("B")      # its own export: outlives `whole`


def _positive(value: object, what: str) -> int:
    n = _index(value, what)
    if n <= 0:
        raise ValueError(f"{what} must be positive, not {n:#x}")
    return n


def _read_number(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _hugepage_size(page_size: int | None) -> int:
    """page_size if this host has hugepages of that size, else the default; a clear error if none."""
    if page_size is None:
        try:
            with open("/proc/meminfo") as f:
                line = next((x for x in f if x.startswith("Hugepagesize:")), None)
        except OSError:
            line = None
        if line is None:
            raise OSError(errno.EOPNOTSUPP, "this kernel has no hugepages "
                                            "(no Hugepagesize in /proc/meminfo)")
        return int(line.split()[1]) * 1024
    page_size = _positive(page_size, "page_size")
    if page_size % 1024 or not os.path.isdir(f"{_HUGEPAGES}/hugepages-{page_size // 1024}kB"):
        have = sorted(int(d[10:-2]) * 1024 for d in _listdir(_HUGEPAGES) if d.startswith("hugepages-"))
        raise ValueError(f"this host has no {_size_name(page_size)} hugepages (it has: "
                         f"{', '.join(map(_size_name, have)) or 'none'})")
    return page_size


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _hugepage_error(e: OSError, size: int, page_size: int) -> OSError:
    """Why mapping size bytes of hugepages failed, in terms of the host's hugepage pool."""
    pool = f"{_HUGEPAGES}/hugepages-{page_size // 1024}kB"
    free, reserved = _read_number(f"{pool}/free_hugepages"), _read_number(f"{pool}/resv_hugepages")
    total, overcommit = _read_number(f"{pool}/nr_hugepages"), _read_number(f"{pool}/nr_overcommit_hugepages")
    name, need = _size_name(page_size), size // page_size
    if e.errno == errno.ENOMEM and free is not None and free - (reserved or 0) < need:
        if not total and not overcommit:
            knob = ("/proc/sys/vm/nr_hugepages" if page_size == _hugepage_size(None)
                    else f"{pool}/nr_hugepages")
            return OSError(e.errno, f"no free {name} hugepages: {knob} is 0 (as root, write "
                                    f"the number of pages to reserve there)")
        return OSError(e.errno, f"not enough free {name} hugepages for {_size_name(size)}: "
                                f"{need} needed, {free - (reserved or 0)} free of {total} "
                                f"({pool}/nr_hugepages)")
    return OSError(e.errno, f"cannot map {_size_name(size)} of {name} hugepages: {e.strerror}")


class Backing(Unshareable):
    """Host memory for memory slots: anonymous, a memfd, a file, hugepages or a caller's buffer.

    Made by its constructors (Backing.memfd() ...), not directly. One backing may back
    several slots, at different GPAs (aliases) and in several VMs; they all see the same
    bytes. It outlives its slots: removing a slot never unmaps it.

    close() while slots still use it is deferred, not refused: the backing is closed at
    once for everything new (add_memory, view(), fileno() refuse it; its own fd is closed),
    but the mapping stays until the last slot using it is removed or its VM closed, since
    a mapping never goes while KVM can reach it. A backing from from_buffer() is never
    unmapped by us: closing it lets go of the buffer, which the caller can then close or
    resize. A view() you hold keeps the mapping alive until you release it.
    """

    __slots__ = ("kind", "size", "host_addr", "file_offset", "_mmap", "_buffer", "_fd", "_users",
                 "_closing", "__weakref__")

    # For every backing: no object of its own for the collector to walk (see _LOCK).
    _lock = _LOCK

    def __init__(self, kind: str, mapping: mmap.mmap | None, buffer: memoryview,
                 fd: int | None = None, file_offset: int = 0) -> None:
        self.kind = kind
        self.size = buffer.nbytes
        self.file_offset = file_offset
        self._mmap = mapping         # ours to unmap; None for a caller's buffer
        self._buffer: memoryview | None = buffer
        self._fd = fd
        # The regions using it: None, the one region (the common case: no set to allocate
        # and for the collector to walk), or a set of two or more.
        self._users: MemoryRegion | set[MemoryRegion] | None = None
        self._closing = False
        self.host_addr = _host_address(buffer)

    @classmethod
    def _mapped(cls, kind: str, mapping: mmap.mmap, fd: int | None = None,
                file_offset: int = 0) -> Backing:
        try:
            return cls(kind, mapping, memoryview(mapping), fd, file_offset)
        except BaseException:
            mapping.close()
            if fd is not None:
                os.close(fd)
            raise

    @classmethod
    def anonymous(cls, size: int, *, populate: bool = False) -> Backing:
        """size bytes of private anonymous memory (MAP_PRIVATE | MAP_ANONYMOUS), zero-filled.
        populate=True: every page is allocated now (MAP_POPULATE), in one go, rather than at
        its first touch; worth it for memory about to be written whole."""
        size = _positive(size, "size")
        flags = mmap.MAP_PRIVATE | (mmap.MAP_POPULATE if populate else 0)
        try:
            mapping = mmap.mmap(-1, size, flags=flags, prot=_READ_WRITE)
        except OverflowError:
            raise OverflowError(f"size={size:#x} is more than a mapping can be") from None
        except OSError as e:
            raise OSError(e.errno, f"cannot map {size:#x} bytes of guest memory: "
                                   f"{e.strerror}") from None
        return cls._mapped("anonymous", mapping)

    @classmethod
    def memfd(cls, size: int, name: str = "kvm-guest-memory", *, hugepages: bool = False,
              page_size: int | None = None) -> Backing:
        """size bytes of a memfd (memfd_create, MAP_SHARED), which another process can map too.

        fileno() is the fd to pass (to vhost-user, a debugger); it is sealed against
        shrinking (F_SEAL_SHRINK), so no holder can pull pages from under the guest.
        hugepages: MFD_HUGETLB, of page_size (default: the host's default hugepage size).
        """
        size = _positive(size, "size")
        flags = os.MFD_CLOEXEC
        if hugepages:
            page_size = _hugepage_size(page_size)
            _check_huge_multiple(size, page_size)
            flags |= os.MFD_HUGETLB | (page_size.bit_length() - 1) << _HUGE_SHIFT
        elif page_size is not None:
            raise ValueError("page_size= is the hugepage size: pass hugepages=True too")
        fd = os.memfd_create(name, flags | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # Sealed against shrinking: whoever holds the fd (another process) could otherwise
            # cut pages from under the mapping, and touching them is SIGBUS: a crash of this
            # interpreter on a plain vm.memory.read(). Growing stays allowed.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            try:
                mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=_READ_WRITE)
            except OSError as e:
                if hugepages:
                    assert page_size is not None
                    raise _hugepage_error(e, size, page_size) from None
                raise OSError(e.errno, f"cannot map {size:#x} bytes of memfd {name!r}: "
                                       f"{e.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        return cls._mapped("memfd", mapping, fd)

    @classmethod
    def file(cls, path_or_fd: str | os.PathLike[str] | int, size: int | None = None,
             offset: int = 0, *, shared: bool = True) -> Backing:
        """size bytes of a file (a path or an fd) from offset; size default: to its end.

        shared: MAP_SHARED, guest writes reach the file (it must be open for writing);
        shared=False: a private copy-on-write mapping (MAP_PRIVATE), the file never changes.
        An fd is duplicated, so the caller keeps its own. The mapping may not run past the
        end of the file: touching it there would be SIGBUS, so grow the file first. For the
        same reason nobody may truncate the file while it is mapped (a file cannot be sealed
        as a memfd is): a host read of a page cut off kills the process with SIGBUS.
        """
        if isinstance(path_or_fd, bool) or not isinstance(path_or_fd, (int, str, os.PathLike)):
            raise TypeError(f"Backing.file() takes a path or an fd, not {type(path_or_fd).__name__}")
        offset = _index(offset, "offset")
        if offset < 0 or offset % mmap.ALLOCATIONGRANULARITY:
            raise ValueError(f"offset ({offset:#x}) must be a multiple of the page size "
                             f"({mmap.ALLOCATIONGRANULARITY:#x}), >= 0")
        if isinstance(path_or_fd, int):
            fd, what = os.dup(path_or_fd), f"fd {path_or_fd}"
        else:
            what = os.fsdecode(path_or_fd)
            fd = os.open(path_or_fd, (os.O_RDWR if shared else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                left = st.st_size - offset
                if left <= 0:
                    raise ValueError(f"offset {offset:#x} is at or past the end of {what} "
                                     f"({st.st_size:#x} bytes); grow the file first")
                size = left if size is None else _index(size, "size")
                if size > left:
                    raise ValueError(f"{what} is {st.st_size:#x} bytes: offset {offset:#x} + "
                                     f"size {size:#x} runs past its end (touching that would be "
                                     f"SIGBUS); grow the file first")
            elif size is None:
                raise ValueError(f"{what} is not a regular file: say how much to map with size=")
            size = _positive(size, "size")
            flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
            try:
                mapping = mmap.mmap(fd, size, flags=flags, prot=_READ_WRITE, offset=offset)
            except OSError as e:
                hint = (" (a shared mapping needs the file open for reading and writing)"
                        if e.errno == errno.EACCES and shared else "")
                raise OSError(e.errno, f"cannot map {what}: {e.strerror}{hint}") from None
        except BaseException:
            os.close(fd)
            raise
        return cls._mapped("file" if shared else "private file", mapping, fd, offset)

    @classmethod
    def hugepages(cls, size: int, page_size: int | None = None) -> Backing:
        """size bytes of private anonymous hugepages (MAP_HUGETLB).

        page_size: the hugepage size (default: the host's default). Where the host has none
        free, an OSError (ENOMEM) saying so and naming the knob that reserves them.
        """
        size = _positive(size, "size")
        page_size = _hugepage_size(page_size)
        _check_huge_multiple(size, page_size)
        flags = mmap.MAP_PRIVATE | _MAP_HUGETLB | (page_size.bit_length() - 1) << _HUGE_SHIFT
        try:
            mapping = mmap.mmap(-1, size, flags=flags, prot=_READ_WRITE)
        except OSError as e:
            raise _hugepage_error(e, size, page_size) from None
        return cls._mapped("hugepages", mapping)

    @classmethod
    def from_buffer(cls, buffer: Any) -> Backing:
        """A caller's writable, contiguous buffer (an mmap, a bytearray...), never unmapped by us.

        A buffer export is held while the backing is open, so the caller cannot close or
        resize it under KVM. KVM maps whole pages: a slot's start (host_addr + offset) must
        fall on a page boundary, which a bytearray's rarely does (see page_offset).
        """
        flat = _writable_bytes(buffer, "from_buffer()", "an mmap, a bytearray...")
        if not flat.nbytes:
            flat.release()
            raise ValueError("from_buffer() needs a buffer of at least one byte")
        return cls("buffer", None, flat)

    @property
    def page_offset(self) -> int:
        """The first offset a slot can start at: 0, but for a buffer not starting on a page."""
        return -self.host_addr % PAGE_SIZE

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        """The live memory regions (of any VM) this backing backs, by offset, then GPA."""
        with self._lock:
            users = self._user_tuple()
        return tuple(sorted(users, key=lambda r: (r.offset, r.guest_phys_addr)))

    def _user_tuple(self) -> tuple[MemoryRegion, ...]:
        """The regions using it (hold the lock)."""
        users = self._users
        if users is None:
            return ()
        return tuple(users) if isinstance(users, set) else (users,)

    def _user_count(self) -> int:
        """How many regions use it; without the lock (for repr), as len() of the set was."""
        users = getattr(self, "_users", None)
        if users is None:
            return 0
        return len(users) if isinstance(users, set) else 1

    def fileno(self) -> int:
        """The memfd's or file's fd (still ours: duplicate it to keep it past close())."""
        with self._lock:
            if self._closing:
                raise self._stale()
            if self._fd is None:
                raise io.UnsupportedOperation(f"{self!r} has no file descriptor; "
                                              f"Backing.memfd() makes memory with one")
            return self._fd

    def view(self) -> memoryview:
        """The whole backing, zero-copy and writable."""
        with self._lock:
            if self._closing or self._buffer is None:
                raise self._stale()
            return self._buffer[:]

    def _stale(self) -> StaleHandleError:
        return StaleHandleError(f"{self!r} is closed")

    def _span(self, offset: object, size: object) -> tuple[int, int]:
        """offset and size (default: the rest) of a slot, checked to be whole pages inside."""
        offset = _index(offset, "offset")
        if not 0 <= offset < self.size:
            raise ValueError(f"offset {offset:#x} is outside {self!r} (0..{self.size:#x})")
        if (self.host_addr + offset) % PAGE_SIZE:
            first = (offset + self.page_offset) % PAGE_SIZE
            raise ValueError(f"offset {offset:#x} of {self!r} is not on a page boundary "
                             f"({PAGE_SIZE:#x}): KVM maps whole pages" +
                             (f"; this buffer's first page starts at offset {first:#x}"
                              if self.page_offset else ""))
        left = self.size - offset
        if size is None:
            size = left - left % PAGE_SIZE
            if not size:
                raise ValueError(f"{self!r} has less than a page left after offset {offset:#x}")
        size = _index(size, "size")
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"size ({size:#x}) must be a positive multiple of the page size "
                             f"({PAGE_SIZE:#x})")
        if size > left:
            raise ValueError(f"offset {offset:#x} + size {size:#x} runs past the end of {self!r}")
        return offset, size

    def _attach(self, region: MemoryRegion, alongside: MemoryRegion | None = None) -> None:
        """region maps part of this backing now; refused once closed, but for a region
        replacing one that does (alongside)."""
        with self._lock:
            users = self._users
            if self._closing and (alongside is None or not (
                    alongside is users or isinstance(users, set) and alongside in users)):
                raise self._stale()
            if users is None:
                self._users = region
            elif isinstance(users, set):
                users.add(region)
            elif users is not region:
                self._users = {users, region}

    def _detach(self, region: MemoryRegion) -> None:
        """region no longer maps this backing (KVM deleted its slot): if it was the last one
        and the backing is closed, the mapping goes now."""
        with self._lock:
            users = self._users
            if users is region:
                self._users = None
            elif isinstance(users, set):
                users.discard(region)
                if not users:
                    self._users = None
            last = self._closing and self._users is None
        if last:
            self._unmap()

    def close(self) -> None:
        """Close the fd now, and unmap now or, if slots use the backing, when the last one goes.

        Closing again does nothing.
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
            fd, self._fd = self._fd, None
            idle = self._users is None
        if fd is not None:
            os.close(fd)
        if idle:
            self._unmap()

    def _unmap(self) -> None:
        """Drop the mapping (ours) or the export (of a caller's buffer); never while slots use it."""
        with self._lock:
            buffer, self._buffer = self._buffer, None
            mapping, self._mmap = self._mmap, None
        if buffer is None:
            return
        try:
            buffer.release()
        except BufferError:
            pass        # re-exported by a caller (ctypes from_buffer...): the mapping stays
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                # A caller still holds a view into it: the mapping lives until that view
                # goes, rather than leaving the view pointing at unmapped memory.
                pass

    def __enter__(self) -> Backing:
        if self._closing:
            raise self._stale()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closing", True):
            close_unclosed(self)

    def __repr__(self) -> str:
        users = self._user_count()
        if getattr(self, "_closing", True):
            state = " closed" + (f", {users} slot(s) still using it" if users else "")
        else:
            state = f" fd={self._fd}" if self._fd is not None else ""
            state += f" slots={users}" if users else ""
        return f"<Backing {getattr(self, 'kind', '?')} size={getattr(self, 'size', 0):#x}{state}>"


def _check_huge_multiple(size: int, page_size: int) -> None:
    if size % page_size:
        raise ValueError(f"size ({size:#x}) must be a multiple of the hugepage size "
                         f"({_size_name(page_size)})")
