"""Memory slots of a VM: regions added, moved and removed, dirty logging, guest_memfd.

The one rule every path here keeps: a slot is deleted in KVM before its mapping
goes, so a guest can never reach host memory the process has reused. A slot's mapping
is a Backing, which may back several slots: it goes only once none uses it, and only if
the runtime mapped it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import abi
from ._fd import CapabilityOwner
from ._layout import check_field, fill
from .backing import PAGE_SIZE, Backing, _index
from .dirty import DirtyBitmap, _range_bitmap
from .errors import KvmError, StaleHandleError
from .memory import GuestMemfd, GuestMemory, MemoryRegion, SlotTable

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["MemorySlots"]


class MemorySlots(CapabilityOwner):
    """The memory half of a Vm (Vm inherits it): KVM_SET_USER_MEMORY_REGION(2) and the
    dirty log, with every region checked to be a live slot of this VM before any ioctl."""

    memory: GuestMemory
    _slots: SlotTable
    _vm_lock: threading.RLock
    _snapshot_epoch: str | None

    def _own(self, region: object, call: str) -> MemoryRegion:
        """region, if it is a live memory region of this VM; else a clear error, before any ioctl."""
        if not isinstance(region, MemoryRegion):
            raise TypeError(f"{call}() takes a MemoryRegion, not {type(region).__name__}")
        owner = region._owner()
        if owner is not self:
            whose = "a VM that is gone" if owner is None else repr(owner)
            raise StaleHandleError(f"{call}(): {region!r} belongs to {whose}, not to {self!r}")
        live = self._slots.get(region.slot)
        if live is None or live is not region:
            raise StaleHandleError(f"{call}(): {region!r} was removed from this VM")
        return live

    def _slot_limit(self) -> int:
        return self.check_extension(abi.Capability.NR_MEMSLOTS) or 0x7FFF

    def _check_slot(self, slot: int) -> int:
        """An explicit slot number: id (low 16 bits) below the per-address-space limit, and an
        address space (high 16 bits) the kernel has (KVM_CAP_MULTI_ADDRESS_SPACE)."""
        slot = check_field(slot, abi.kvm_userspace_memory_region, "slot")
        limit = self._slot_limit()
        spaces = self.check_extension(abi.Capability.MULTI_ADDRESS_SPACE) or 1
        if slot & 0xFFFF >= limit or slot >> 16 >= spaces:
            raise ValueError(f"slot {slot} is out of range: this kernel has {limit} memory slots "
                             f"(0..{limit - 1}) in each of {spaces} address space(s); the address "
                             f"space goes in bits 16..31")
        if self._slots.get(slot) is not None:
            raise ValueError(f"slot {slot} is in use by {self._slots.get(slot)!r}")
        return slot

    def _check_range(self, guest_phys_addr: int, size: int) -> tuple[int, int]:
        gpa = check_field(guest_phys_addr, abi.kvm_userspace_memory_region, "guest_phys_addr")
        size = check_field(size, abi.kvm_userspace_memory_region, "memory_size", "size")
        if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
            raise ValueError(f"guest_phys_addr ({gpa:#x}) and size ({size:#x}) must be "
                             f"multiples of the page size ({PAGE_SIZE:#x}), size > 0")
        if gpa + size > 1 << 64:
            raise OverflowError(f"{gpa:#x} + {size:#x} runs past the end of the 64-bit "
                                f"guest-physical address space")
        return gpa, size

    def add_memory(self, guest_phys_addr: int, size: int | None = None, *,
                   backing: Backing | None = None, offset: int = 0, readonly: bool = False,
                   log_dirty: bool = False, slot: int | None = None,
                   guest_memfd: GuestMemfd | None = None,
                   guest_memfd_offset: int = 0) -> MemoryRegion:
        """Register host memory as a memory slot at guest_phys_addr (KVM_SET_USER_MEMORY_REGION).

        backing: a Backing to map size bytes of from offset (size default: its whole pages
        after offset); it may back other slots too, of this VM or others, and removing the
        slot leaves it mapped. Without one, size bytes of fresh anonymous memory are mapped
        for this slot alone, and unmapped when it goes. readonly: guest writes exit as MMIO
        (KVM_CAP_READONLY_MEM). log_dirty: track written pages for get_dirty_log().
        guest_memfd: back private memory with a guest_memfd of this VM
        (KVM_SET_USER_MEMORY_REGION2, KVM_CAP_GUEST_MEMFD). slot: the slot number (default:
        the lowest free one). Every argument is checked before KVM is asked for the slot.
        Safe from several threads.
        """
        self.fd  # noqa: B018 - a closed VM refuses before anything is mapped
        if backing is not None:
            if not isinstance(backing, Backing):
                raise TypeError(f"backing must be a Backing (Backing.memfd(), .file(), "
                                f".from_buffer()...), not {type(backing).__name__}")
            offset, size = backing._span(offset, size)
        elif size is None:
            raise TypeError("add_memory() needs a size, or a backing= to take it from")
        elif _index(offset, "offset"):
            raise ValueError("offset= is where in backing= the slot starts: it needs a backing")
        gpa, size = self._check_range(guest_phys_addr, size)
        flags = 0
        if readonly:
            self.require(abi.Capability.READONLY_MEM, "read-only memory slots")
            flags |= abi.KVM_MEM_READONLY
        if log_dirty:
            flags |= abi.KVM_MEM_LOG_DIRTY_PAGES
        if guest_memfd is not None:
            self.require(abi.Capability.GUEST_MEMFD, "guest_memfd memory")
            if not isinstance(guest_memfd, GuestMemfd):
                raise TypeError(f"guest_memfd must be a GuestMemfd from vm.create_guest_memfd(), "
                                f"not {type(guest_memfd).__name__}")
            if guest_memfd.vm is not self or guest_memfd.closed:
                raise StaleHandleError(f"{guest_memfd!r} is closed or belongs to another VM")
            flags |= abi.KVM_MEM_GUEST_MEMFD
        check_field(guest_memfd_offset, abi.kvm_userspace_memory_region2, "guest_memfd_offset")
        with self._vm_lock:
            clash = self.memory.overlapping(gpa, size)
            if clash is not None:
                raise ValueError(f"{gpa:#x}..{gpa + size:#x} overlaps {clash!r}")
            if slot is None:
                slot = self._slots.lowest_free()
                if slot >= self._slot_limit():
                    raise KvmError("KVM_SET_USER_MEMORY_REGION", errno.ENOSPC,
                                   f"all {self._slot_limit()} memory slots are in use")
            else:
                slot = self._check_slot(slot)
            owned = backing is None
            if backing is None:
                backing = Backing.anonymous(size)
            try:
                region = MemoryRegion(slot, gpa, size, flags, backing, offset, guest_memfd,
                                      guest_memfd_offset, owner=self, owns_backing=owned)
            except BaseException:
                if owned:
                    backing.close()
                raise
            try:
                self._set_region(region)
            except BaseException:
                region._unmap()       # KVM never had the slot: the mapping can go at once
                raise
            self._slots.claim(slot, region)
            self.memory._add(region)
        return region

    def _set_region(self, region: MemoryRegion, size: int | None = None, flags: int | None = None,
                    gpa: int | None = None, *, closing: bool = False) -> None:
        """KVM_SET_USER_MEMORY_REGION(2) for region, optionally with another size (0 deletes
        the slot), flags or address. closing: from _release, on the fd close() is about to
        close (every other caller goes through ioctl(), which refuses a closed VM)."""
        size = region.size if size is None else size
        fields = {"slot": region.slot, "flags": region.flags if flags is None else flags,
                  "guest_phys_addr": region.guest_phys_addr if gpa is None else gpa,
                  "memory_size": size, "userspace_addr": region.host_addr}
        memfd = region.guest_memfd if size else None
        if memfd is not None:
            self.require(abi.Capability.USER_MEMORY2, "KVM_SET_USER_MEMORY_REGION2")
            memfd._hold()       # its fd number stays its own until KVM has taken the file
            req: abi.kvm_userspace_memory_region2 | abi.kvm_userspace_memory_region
            req = fill(abi.kvm_userspace_memory_region2, guest_memfd=memfd._fd,
                       guest_memfd_offset=region.guest_memfd_offset, **fields)
            number, name = abi.KVM_SET_USER_MEMORY_REGION2, "KVM_SET_USER_MEMORY_REGION2"
        else:
            if not size:
                # Deleting a slot, KVM reads nothing but its number: no flags, and no
                # guest_memfd (which the caller may have closed meanwhile).
                fields.update(flags=0, guest_phys_addr=0, userspace_addr=0)
            req = fill(abi.kvm_userspace_memory_region, **fields)
            number, name = abi.KVM_SET_USER_MEMORY_REGION, "KVM_SET_USER_MEMORY_REGION"
        try:
            if closing:
                self._raw_ioctl(number, ctypes.addressof(req), name)
            else:
                self.ioctl(number, req, name=name)
        finally:
            if memfd is not None:
                memfd._unhold()

    def _forget(self, region: MemoryRegion) -> None:
        """After KVM deleted region's slot: drop it from the tables, then let go of its backing."""
        self._slots.release(region.slot)
        self.memory._remove(region)
        region._unmap()

    def remove_memory(self, region: MemoryRegion) -> None:
        """Delete the memory slot in KVM, then let go of its backing: unmapped if add_memory
        mapped it for this slot, else left as it was. The region is stale after."""
        with self._vm_lock:
            self._own(region, "remove_memory")
            interrupted = self._delete_slot(region)
            self._forget(region)
        if interrupted is not None:
            raise interrupted

    def move_memory(self, region: MemoryRegion, guest_phys_addr: int) -> None:
        """Move a slot to another GPA; its contents stay (KVM deletes and re-creates it)."""
        with self._vm_lock:
            self._own(region, "move_memory")
            gpa, _ = self._check_range(guest_phys_addr, region.size)
            clash = self.memory.overlapping(gpa, region.size)
            if clash is not None and clash is not region:
                raise ValueError(f"{gpa:#x} overlaps {clash!r}")
            if region.guest_memfd is not None:
                region.guest_memfd.fd  # noqa: B018 - closed: refuse before deleting anything
            self._swap_slot(region, lambda: self._set_region(region, gpa=gpa))
            self.memory._remove(region)
            region.guest_phys_addr = gpa
            self.memory._add(region)

    def _swap_slot(self, old: MemoryRegion, add: Callable[[], None]) -> None:
        """Delete old's slot in KVM, then add() its replacement (a slot cannot change in
        place). If add() fails, old goes back as it was; if even that fails, old is forgotten,
        since KVM has no slot for it any more."""
        self._set_region(old, size=0)
        try:
            add()
        except BaseException:
            try:
                self._set_region(old)
            except BaseException:
                self._forget(old)
                raise
            raise

    def set_readonly(self, region: MemoryRegion, readonly: bool) -> MemoryRegion:
        """Make a slot read-only (guest writes exit as MMIO) or writable, its contents kept.

        KVM cannot change KVM_MEM_READONLY in place: the slot is deleted and added again, same
        number, GPA and backing. Returns the new region; region is stale after (unless it
        already was as asked: then it is returned as it is). A vCPU running meanwhile may
        see an MMIO exit for that range. KVM_CAP_READONLY_MEM.
        """
        with self._vm_lock:
            old = self._own(region, "set_readonly")
            if readonly:
                self.require(abi.Capability.READONLY_MEM, "read-only memory slots")
            flags = (old.flags | abi.KVM_MEM_READONLY if readonly
                     else old.flags & ~abi.KVM_MEM_READONLY)
            if flags == old.flags:
                return old
            if old.guest_memfd is not None:
                old.guest_memfd.fd  # noqa: B018 - closed: refuse before deleting anything
            # Holds the backing too, so the mapping stays while KVM has neither slot.
            new = MemoryRegion(old.slot, old.guest_phys_addr, old.size, flags, old.backing,
                               old.offset, old.guest_memfd, old.guest_memfd_offset, owner=self,
                               replacing=old)
            try:
                self._swap_slot(old, lambda: self._set_region(new))
            except BaseException:
                new._unmap()
                raise
            new._owns_backing, old._owns_backing = old._owns_backing, False
            self._slots.replace(old.slot, new)
            self.memory._replace(old, new)
            old._unmap()                              # the backing stays: new maps it
        return new

    def set_dirty_logging(self, region: MemoryRegion, enabled: bool) -> None:
        """Turn KVM_MEM_LOG_DIRTY_PAGES on or off for a live region of this VM."""
        with self._vm_lock:
            self._own(region, "set_dirty_logging")
            flags = (region.flags | abi.KVM_MEM_LOG_DIRTY_PAGES if enabled
                     else region.flags & ~abi.KVM_MEM_LOG_DIRTY_PAGES)
            self._set_region(region, flags=flags)
            region.flags = flags

    def _logged(self, region: MemoryRegion, call: str) -> MemoryRegion:
        live = self._own(region, call)
        if not live.flags & abi.KVM_MEM_LOG_DIRTY_PAGES:
            raise ValueError(f"dirty logging is off for {region!r}; "
                             f"add_memory(..., log_dirty=True) or set_dirty_logging()")
        return live

    def get_dirty_log(self, region: MemoryRegion) -> DirtyBitmap:
        """KVM_GET_DIRTY_LOG: the pages written since the log was last read (which resets it,
        unless KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is enabled: then clear_dirty_log() does).

        A DirtyBitmap over the buffer KVM filled: len() dirty pages, iterating gives their
        GPAs in order, runs() gives (gpa, pages) per run of consecutive dirty pages.
        """
        self._snapshot_epoch = None    # save_state(base=) would miss the pages read here
        with self._vm_lock:
            live = self._logged(region, "get_dirty_log")
            # KVM fills one bit per page of the slot as it knows it: size the bitmap from the
            # live slot, never from anything a caller could hand in.
            bitmap = DirtyBitmap._for_slot(live)
            address, keep = bitmap._address()
            log = abi.kvm_dirty_log(slot=live.slot)
            log.dirty_bitmap = address
            self.ioctl(abi.KVM_GET_DIRTY_LOG, log)
            del keep
        return bitmap

    def clear_dirty_log(self, region: MemoryRegion,
                        pages: DirtyBitmap | range | Buffer | None = None) -> None:
        """KVM_CLEAR_DIRTY_LOG (with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled): re-protect
        pages of a live region of this VM, so that the next log shows only those written
        after.

        pages: a DirtyBitmap of this region (from get_dirty_log(), maybe edited), or any
        buffer in KVM's layout for the whole slot (one bit per page, whole 64-bit words);
        the pages whose bits are set are cleared. Or a range of page indexes in the region
        (range(first, stop), step 1). None: the whole region.
        """
        self.require(abi.Capability.MANUAL_DIRTY_LOG_PROTECT2, "KVM_CLEAR_DIRTY_LOG")
        with self._vm_lock:
            live = self._logged(region, "clear_dirty_log")
            total = live.size // PAGE_SIZE
            if pages is None or isinstance(pages, range):
                span = _range_bitmap(range(total) if pages is None else pages, total)
                if span is None:
                    return                          # an empty range: nothing to clear
                first, count, bitmap = span
                raw: Any = (ctypes.c_char * len(bitmap)).from_buffer(bitmap)
            else:
                first, count = 0, total
                if isinstance(pages, DirtyBitmap):
                    if (pages.base, pages.pages) != (live.guest_phys_addr, total):
                        raise ValueError(
                            f"{pages!r} covers {pages.pages} pages from {pages.base:#x}, not "
                            f"{region!r} ({total} pages from {live.guest_phys_addr:#x})")
                raw = _bitmap_of(pages, total)
            clear = abi.kvm_clear_dirty_log(slot=live.slot, num_pages=count, first_page=first)
            clear.dirty_bitmap = ctypes.addressof(raw)
            self.ioctl(abi.KVM_CLEAR_DIRTY_LOG, clear)
            del raw

    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd:
        """KVM_CREATE_GUEST_MEMFD: guest-private memory, closed with the VM."""
        self.require(abi.Capability.GUEST_MEMFD, "KVM_CREATE_GUEST_MEMFD")
        req = fill(abi.kvm_create_guest_memfd, size=size, flags=flags)
        memfd = GuestMemfd(self, self.ioctl(abi.KVM_CREATE_GUEST_MEMFD, req), req.size)
        # Every other fd KVM makes is O_CLOEXEC; this one is not (6.18): an exec'ed program
        # would inherit guest-private memory it can do nothing with.
        os.set_inheritable(memfd._fd, False)
        self._adopt(memfd)
        return memfd

    def set_memory_attributes(self, address: int, size: int, attributes: int) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES, e.g. KVM_MEMORY_ATTRIBUTE_PRIVATE for a guest_memfd range."""
        self.require(abi.Capability.MEMORY_ATTRIBUTES, "KVM_SET_MEMORY_ATTRIBUTES")
        self.ioctl(abi.KVM_SET_MEMORY_ATTRIBUTES,
                   fill(abi.kvm_memory_attributes, address=address, size=size, attributes=attributes))


    def _delete_all_slots(self) -> None:
        """The kernel's rule: a slot is deleted in KVM before its mapping goes. A vCPU that
        did not stop in time would otherwise write into whatever the process maps at that
        address next. A slot KVM would not delete stays mapped for good; the rest go on."""
        failed: list[BaseException] = []
        with self._vm_lock:
            for region in self.memory.regions:
                try:
                    interrupted = self._delete_slot(region, closing=True)
                except BaseException as e:
                    _NEVER_UNMAPPED.append(region)   # KVM may still use it: keep it mapped
                    failed.append(e)
                    continue
                self._forget(region)
                if interrupted is not None:
                    failed.append(interrupted)
        if failed:
            raise failed[0]

    def _delete_slot(self, region: MemoryRegion, closing: bool = False) -> BaseException | None:
        """Delete region's slot in KVM; returns once KVM has no such slot. Interrupted (Ctrl-C
        as the ioctl returned: did it run?), it asks once more, and returns the interruption
        for the caller to raise when its bookkeeping is done."""
        try:
            self._delete_slot_once(region, closing)
        except KvmError:
            raise
        except BaseException as interrupted:
            self._delete_slot_once(region, closing)
            return interrupted
        return None

    def _delete_slot_once(self, region: MemoryRegion, closing: bool) -> None:
        try:
            self._set_region(region, size=0, closing=closing)
        except KvmError as e:
            if e.errno != errno.EINVAL:   # KVM's answer to deleting a slot it does not have
                raise


def _bitmap_of(buffer: Any, pages: int) -> Any:
    """A caller's bitmap of a slot of `pages` pages as ctypes memory KVM can read: the buffer
    itself if writable, else a copy; a clear error for anything not that size."""
    try:
        view = memoryview(buffer)
    except TypeError:
        raise TypeError(f"clear_dirty_log() takes a DirtyBitmap, a buffer or a range of pages, "
                        f"not {type(buffer).__name__}") from None
    with view:
        size = (pages + 63) // 64 * 8
        if view.nbytes != size or not view.c_contiguous:
            raise ValueError(f"a bitmap for a slot of {pages} pages is {size} contiguous bytes "
                             f"(one bit per page, whole 64-bit words), not {view.nbytes}")
        if view.readonly:
            return (ctypes.c_char * size).from_buffer_copy(view)
    return (ctypes.c_char * size).from_buffer(buffer)


# Mappings KVM may still reach (deleting their slot failed): kept for the life of the process.
_NEVER_UNMAPPED: list[MemoryRegion] = []
