"""Vm: a "kvm-vm" fd (kvm_vm_ioctl in the kernel)."""

from __future__ import annotations

import atexit
import ctypes
import errno
import mmap
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _requests, abi
from . import vcpu as vcpu_module
from ._fd import CapabilityOwner
from ._layout import check_field, check_int, expect, fill
from .device import Device, DeviceAttributes
from .errors import KvmError, KvmUnsupported, StaleHandleError
from .memory import PAGE_SIZE, GuestMemfd, GuestMemory, MemoryRegion, SlotTable
from .stats import Stats
from .vcpu import Vcpu, map_run_page

if TYPE_CHECKING:
    from .system import Kvm


class Vm(CapabilityOwner, DeviceAttributes):
    """One virtual machine: memory slots, vCPUs, interrupt plumbing, devices.

    Closing the VM stops and closes its vCPUs (kicking any that are running), closes
    its devices, deletes every memory slot in KVM and only then unmaps the memory:
    the guest can never reach host memory the process has reused.
    """

    def __init__(self, kvm: Kvm, fd: int, vm_type: int = 0) -> None:
        super().__init__(fd)
        self.kvm = kvm
        self.vm_type = vm_type
        self.memory = GuestMemory()
        self._slots = SlotTable()
        self._vm_lock = threading.RLock()   # memory slots and vCPU creation
        self._vcpus: dict[int, Vcpu] = {}
        self._unmapped_vcpu_fds: dict[int, int] = {}
        self._caps: dict[int, int] = {}
        _LIVE_VMS.add(self)
        try:
            # What the VM needs from /dev/kvm later, asked now: the VM outlives a closed Kvm.
            self.vcpu_mmap_size = kvm.vcpu_mmap_size
            self._ask_vm_fd = bool(kvm.check_extension(abi.Capability.CHECK_EXTENSION_VM))
        except BaseException:
            self.close()
            raise

    # -- capabilities
    def _ask_extension(self, cap: int) -> int:
        """On the VM fd where the kernel supports it (KVM_CAP_CHECK_EXTENSION_VM), else on
        /dev/kvm."""
        if self._ask_vm_fd:
            return super()._ask_extension(cap)
        return self.kvm.check_extension(cap)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM with up to four arguments."""
        self.require(abi.Capability.ENABLE_CAP_VM, "KVM_ENABLE_CAP on a VM")
        self.ioctl(abi.KVM_ENABLE_CAP, _requests.enable_cap(cap, args, flags))

    # -- memory
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

    def add_memory(self, guest_phys_addr: int, size: int, *, readonly: bool = False,
                   log_dirty: bool = False, slot: int | None = None,
                   guest_memfd: GuestMemfd | None = None,
                   guest_memfd_offset: int = 0) -> MemoryRegion:
        """Map anonymous memory and register it as a memory slot at guest_phys_addr.

        readonly: guest writes exit as MMIO (KVM_CAP_READONLY_MEM). log_dirty: track
        written pages for dirty_log(). guest_memfd: back private memory with a
        guest_memfd of this VM (KVM_SET_USER_MEMORY_REGION2, KVM_CAP_GUEST_MEMFD).
        slot: the slot number (default: the lowest free one). Safe from several threads.
        """
        self.fd  # noqa: B018 - a closed VM refuses before anything is mapped
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
            try:
                backing = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as e:
                raise OSError(e.errno, f"cannot map {size:#x} bytes of guest memory: "
                                       f"{e.strerror}") from None
            region = MemoryRegion(slot, gpa, size, flags, backing, guest_memfd,
                                  guest_memfd_offset, owner=self)
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
        """After KVM deleted region's slot: drop it from the tables, then unmap it."""
        self._slots.release(region.slot)
        self.memory._remove(region)
        region._unmap()

    def remove_memory(self, region: MemoryRegion) -> None:
        """Delete the memory slot in KVM, then unmap its memory. The region is stale after."""
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
            self._set_region(region, size=0)   # a slot cannot move in place
            try:
                self._set_region(region, gpa=gpa)
            except BaseException:
                try:
                    self._set_region(region)          # back where it was
                except BaseException:
                    self._forget(region)              # KVM has no slot for it any more
                    raise
                raise
            self.memory._remove(region)
            region.guest_phys_addr = gpa
            self.memory._add(region)

    def set_dirty_logging(self, region: MemoryRegion, enabled: bool) -> None:
        """Turn KVM_MEM_LOG_DIRTY_PAGES on or off for a live region of this VM."""
        with self._vm_lock:
            self._own(region, "set_dirty_logging")
            flags = (region.flags | abi.KVM_MEM_LOG_DIRTY_PAGES if enabled
                     else region.flags & ~abi.KVM_MEM_LOG_DIRTY_PAGES)
            self._set_region(region, flags=flags)
            region.flags = flags

    def dirty_log(self, region: MemoryRegion) -> list[int]:
        """KVM_GET_DIRTY_LOG: GPAs of the pages written since the last call (which resets it)."""
        with self._vm_lock:
            live = self._own(region, "dirty_log")
            if not live.flags & abi.KVM_MEM_LOG_DIRTY_PAGES:
                raise ValueError(f"dirty logging is off for {region!r}; "
                                 f"add_memory(..., log_dirty=True) or set_dirty_logging()")
            # KVM fills one bit per page of the slot as it knows it: size the bitmap from the
            # live slot, never from anything a caller could hand in.
            pages = live.size // PAGE_SIZE
            bitmap = (ctypes.c_uint64 * ((pages + 63) // 64))()
            log = abi.kvm_dirty_log(slot=live.slot)
            log.dirty_bitmap = ctypes.addressof(bitmap)
            self.ioctl(abi.KVM_GET_DIRTY_LOG, log)
            base = live.guest_phys_addr
        out = []
        for word_index, word in enumerate(bitmap):
            while word:
                bit = (word & -word).bit_length() - 1
                out.append(base + (word_index * 64 + bit) * PAGE_SIZE)
                word &= word - 1
        return out

    def clear_dirty_log(self, region: MemoryRegion, first_page: int = 0,
                        num_pages: int | None = None) -> None:
        """KVM_CLEAR_DIRTY_LOG (needs KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled): re-protect
        num_pages pages from first_page (a multiple of 64) of a live region of this VM."""
        self.require(abi.Capability.MANUAL_DIRTY_LOG_PROTECT2, "KVM_CLEAR_DIRTY_LOG")
        with self._vm_lock:
            live = self._own(region, "clear_dirty_log")
            total = live.size // PAGE_SIZE
            first = check_field(first_page, abi.kvm_clear_dirty_log, "first_page")
            pages = total - first if num_pages is None else check_field(
                num_pages, abi.kvm_clear_dirty_log, "num_pages")
            if first % 64 or first + pages > total:
                raise ValueError(f"pages {first}..{first + pages} are not a range of {region!r} "
                                 f"({total} pages) starting at a multiple of 64")
            words = (pages + 63) // 64
            bitmap = (ctypes.c_uint64 * words)(*([(1 << 64) - 1] * words))
            clear = abi.kvm_clear_dirty_log(slot=live.slot, num_pages=pages, first_page=first)
            clear.dirty_bitmap = ctypes.addressof(bitmap)
            self.ioctl(abi.KVM_CLEAR_DIRTY_LOG, clear)

    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd:
        """KVM_CREATE_GUEST_MEMFD: guest-private memory, closed with the VM."""
        self.require(abi.Capability.GUEST_MEMFD, "KVM_CREATE_GUEST_MEMFD")
        req = fill(abi.kvm_create_guest_memfd, size=size, flags=flags)
        memfd = GuestMemfd(self, self.ioctl(abi.KVM_CREATE_GUEST_MEMFD, req), req.size)
        self._adopt(memfd)
        return memfd

    def set_memory_attributes(self, address: int, size: int, attributes: int) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES, e.g. KVM_MEMORY_ATTRIBUTE_PRIVATE for a guest_memfd range."""
        self.require(abi.Capability.MEMORY_ATTRIBUTES, "KVM_SET_MEMORY_ATTRIBUTES")
        self.ioctl(abi.KVM_SET_MEMORY_ATTRIBUTES,
                   fill(abi.kvm_memory_attributes, address=address, size=size, attributes=attributes))

    # -- vCPUs
    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU: a "kvm-vcpu" fd with its kvm_run mapped.

        vcpu_id must be below KVM_CAP_MAX_VCPU_ID. If the process is out of file
        descriptors nothing is created; if the kvm_run mapping fails after KVM made the
        vCPU, the fd is kept and create_vcpu(vcpu_id) tries the mapping again.
        """
        vcpu_id = check_int(vcpu_id, ctypes.c_ulong, "vcpu_id")
        limit = self.check_extension(abi.Capability.MAX_VCPU_ID) or self.kvm.max_vcpus
        if vcpu_id >= limit:
            raise ValueError(f"vcpu_id {vcpu_id} is out of range: KVM_CAP_MAX_VCPU_ID is {limit}")
        with self._vm_lock:
            if vcpu_id in self._vcpus and not self._vcpus[vcpu_id].closed:
                raise ValueError(f"vCPU {vcpu_id} already exists")
            fd = self._unmapped_vcpu_fds.pop(vcpu_id, None)
            if fd is None:
                # Python's mmap keeps a duplicate of the fd it maps: a vCPU needs two free
                # descriptors. Hold one while KVM makes the vCPU, so that running out
                # happens before the id is used up, never after.
                try:
                    spare = os.dup(self.fd)
                except OSError as e:
                    raise KvmError("KVM_CREATE_VCPU", e.errno or errno.EMFILE,
                                   f"no free file descriptor for vCPU {vcpu_id} (each vCPU needs "
                                   f"two); nothing was created") from None
                try:
                    fd = self.ioctl(abi.KVM_CREATE_VCPU, vcpu_id)
                except KvmError as e:
                    if e.errno not in (errno.EMFILE, errno.ENFILE):
                        raise
                    # KVM destroys a vCPU it could not give an fd: the id stays free.
                    raise KvmError("KVM_CREATE_VCPU", e.errno,
                                   f"no free file descriptor for vCPU {vcpu_id} (each vCPU needs "
                                   f"two); nothing was created") from None
                finally:
                    os.close(spare)
            try:
                page = map_run_page(fd, self.vcpu_mmap_size)
            except OSError as e:
                self._unmapped_vcpu_fds[vcpu_id] = fd
                raise KvmError("mmap of kvm_run", e.errno or errno.ENOMEM,
                               f"KVM created vCPU {vcpu_id} but its kvm_run page could not be "
                               f"mapped; its fd is kept: free some file descriptors or memory "
                               f"and call create_vcpu({vcpu_id}) again") from None
            vcpu = Vcpu(self, fd, vcpu_id, page)
            with self._lock:
                if not self._closing:
                    self._vcpus[vcpu_id] = vcpu
                    return vcpu
            vcpu.close()                   # the VM was closed meanwhile: nothing escapes it
            raise self._stale()

    @property
    def vcpus(self) -> tuple[Vcpu, ...]:
        """The open vCPUs, ordered by vCPU id."""
        return tuple(v for _, v in sorted(self._vcpus.items()) if not v.closed)

    # -- x86 system setup
    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: three pages of guest-physical space for the real-mode TSS (Intel)."""
        self.ioctl(abi.KVM_SET_TSS_ADDR, check_int(addr, ctypes.c_ulong, "addr"))

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: one page for the real-mode EPT identity map (Intel)."""
        self.require(abi.Capability.SET_IDENTITY_MAP_ADDR, "KVM_SET_IDENTITY_MAP_ADDR")
        self.ioctl(abi.KVM_SET_IDENTITY_MAP_ADDR,
                   ctypes.c_uint64(check_int(addr, ctypes.c_uint64, "addr")))

    # -- interrupt controllers
    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and local APICs (create vCPUs after)."""
        self.require(abi.Capability.IRQCHIP, "KVM_CREATE_IRQCHIP")
        if self.vcpus:
            raise KvmError("KVM_CREATE_IRQCHIP", errno.EINVAL,
                           "the in-kernel irqchip must be created before any vCPU")
        self.ioctl(abi.KVM_CREATE_IRQCHIP)

    def get_irqchip(self, chip_id: int) -> Any:
        """KVM_GET_IRQCHIP -> kvm_irqchip (abi.KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE, _IOAPIC)."""
        return self._get(abi.KVM_GET_IRQCHIP, abi.kvm_irqchip, chip_id=chip_id)

    def set_irqchip(self, chip: Any) -> None:
        self.ioctl(abi.KVM_SET_IRQCHIP, expect(chip, abi.kvm_irqchip, "set_irqchip()"))

    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2: the in-kernel i8254 timer."""
        self.require(abi.Capability.PIT2, "KVM_CREATE_PIT2")
        self.ioctl(abi.KVM_CREATE_PIT2, fill(abi.kvm_pit_config, flags=flags))

    def get_pit2(self) -> Any:
        return self._get(abi.KVM_GET_PIT2, abi.kvm_pit_state2)

    def set_pit2(self, state: Any) -> None:
        self.ioctl(abi.KVM_SET_PIT2, expect(state, abi.kvm_pit_state2, "set_pit2()"))

    def irq_line(self, irq: int, level: int) -> int:
        """Raise or lower a GSI on the in-kernel irqchip; returns the status where the kernel gives one."""
        line = fill(abi.kvm_irq_level, level=level, irq=irq)
        if self.check_extension(abi.Capability.IRQ_INJECT_STATUS):
            self.ioctl(abi.KVM_IRQ_LINE_STATUS, line)
            return int(line.status)
        self.ioctl(abi.KVM_IRQ_LINE, line)
        return 0

    def signal_msi(self, address: int, data: int, flags: int = 0, devid: int = 0) -> int:
        """KVM_SIGNAL_MSI: inject one MSI; > 0 delivered, 0 blocked by the guest."""
        self.require(abi.Capability.SIGNAL_MSI, "KVM_SIGNAL_MSI")
        address = check_int(address, ctypes.c_uint64, "address", where="kvm_msi.address_hi:address_lo")
        msi = fill(abi.kvm_msi, address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data,
                   flags=flags, devid=devid)
        return self.ioctl(abi.KVM_SIGNAL_MSI, msi)

    def set_gsi_routing(self, entries: list[Any]) -> None:
        """KVM_SET_GSI_ROUTING: replace the whole routing table with these kvm_irq_routing_entry."""
        self.require(abi.Capability.IRQ_ROUTING, "KVM_SET_GSI_ROUTING")
        entries = [expect(e, abi.kvm_irq_routing_entry, "set_gsi_routing() entries") for e in entries]
        table = abi.kvm_irq_routing.alloc(len(entries))
        for slot, entry in zip(table.flex_array(), entries):
            ctypes.memmove(ctypes.addressof(slot), ctypes.addressof(entry), ctypes.sizeof(slot))
        self.ioctl(abi.KVM_SET_GSI_ROUTING, table)

    def irqfd(self, eventfd: int, gsi: int, resample_fd: int | None = None) -> None:
        """KVM_IRQFD: a write to eventfd raises gsi; with resample_fd, a level interrupt
        whose EOI signals resample_fd."""
        self.require(abi.Capability.IRQFD, "KVM_IRQFD")
        names = {"fd": "eventfd", "resamplefd": "resample_fd"}
        if resample_fd is None:
            req = fill(abi.kvm_irqfd, names, fd=eventfd, gsi=gsi)
        else:
            self.require(abi.Capability.IRQFD_RESAMPLE, "KVM_IRQFD with resample")
            req = fill(abi.kvm_irqfd, names, fd=eventfd, gsi=gsi, resamplefd=resample_fd,
                       flags=abi.KVM_IRQFD_FLAG_RESAMPLE)
        self.ioctl(abi.KVM_IRQFD, req)

    def irqfd_remove(self, eventfd: int, gsi: int) -> None:
        self.ioctl(abi.KVM_IRQFD, fill(abi.kvm_irqfd, {"fd": "eventfd"}, fd=eventfd, gsi=gsi,
                                       flags=abi.KVM_IRQFD_FLAG_DEASSIGN))

    def _ioeventfd(self, eventfd: int, addr: int, length: int, datamatch: int | None, pio: bool,
                   extra: int) -> None:
        self.require(abi.Capability.IOEVENTFD, "KVM_IOEVENTFD")
        flags = extra
        if pio:
            flags |= abi.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= abi.KVM_IOEVENTFD_FLAG_DATAMATCH
        self.ioctl(abi.KVM_IOEVENTFD, fill(
            abi.kvm_ioeventfd, {"fd": "eventfd", "len": "length"},
            datamatch=datamatch or 0, addr=addr, len=length, fd=eventfd, flags=flags))

    def ioeventfd(self, eventfd: int, addr: int, length: int, *, datamatch: int | None = None,
                  pio: bool = False) -> None:
        """KVM_IOEVENTFD: guest writes to addr (MMIO, or a port with pio=True) signal eventfd
        instead of exiting; with datamatch, only writes of that value."""
        self._ioeventfd(eventfd, addr, length, datamatch, pio, 0)

    def ioeventfd_remove(self, eventfd: int, addr: int, length: int, *,
                         datamatch: int | None = None, pio: bool = False) -> None:
        self._ioeventfd(eventfd, addr, length, datamatch, pio, abi.KVM_IOEVENTFD_FLAG_DEASSIGN)

    def _coalesced_zone(self, addr: int, size: int, pio: bool) -> Any:
        return fill(abi.kvm_coalesced_mmio_zone, addr=addr, size=size, pio=int(pio))

    def register_coalesced_mmio(self, addr: int, size: int, *, pio: bool = False) -> None:
        """Buffer guest writes to this range in the coalesced ring instead of exiting."""
        if pio:
            self.require(abi.Capability.COALESCED_PIO, "coalesced PIO")
        else:
            self.require(abi.Capability.COALESCED_MMIO, "coalesced MMIO")
        self.ioctl(abi.KVM_REGISTER_COALESCED_MMIO, self._coalesced_zone(addr, size, pio))

    def unregister_coalesced_mmio(self, addr: int, size: int, *, pio: bool = False) -> None:
        self.ioctl(abi.KVM_UNREGISTER_COALESCED_MMIO, self._coalesced_zone(addr, size, pio))

    def get_clock(self) -> Any:
        """KVM_GET_CLOCK: the guest's kvmclock (kvm_clock_data)."""
        return self._get(abi.KVM_GET_CLOCK, abi.kvm_clock_data)

    def set_clock(self, clock: Any) -> None:
        self.ioctl(abi.KVM_SET_CLOCK, expect(clock, abi.kvm_clock_data, "set_clock()"))

    def set_msr_filter(self, ranges: list[tuple[int, int, int, bytes]], *,
                       default_deny: bool = False) -> None:
        """KVM_X86_SET_MSR_FILTER: ranges of (flags, base MSR, count, bitmap); a set bit allows
        the access, a clear one exits (with KVM_MSR_EXIT_REASON_FILTER enabled) or injects #GP.
        flags are KVM_MSR_FILTER_READ / KVM_MSR_FILTER_WRITE."""
        self.require(abi.Capability.X86_MSR_FILTER, "KVM_X86_SET_MSR_FILTER")
        filt = abi.kvm_msr_filter(flags=abi.KVM_MSR_FILTER_DEFAULT_DENY if default_deny
                                  else abi.KVM_MSR_FILTER_DEFAULT_ALLOW)
        if len(ranges) > len(filt.ranges):
            raise ValueError(f"at most {len(filt.ranges)} MSR filter ranges")
        keep = []
        for slot, (flags, base, count, bitmap) in zip(filt.ranges, ranges):
            fill(slot, {"base": "base MSR", "nmsrs": "count"}, flags=flags, base=base, nmsrs=count)
            if len(bitmap) * 8 < count:
                raise ValueError(f"the bitmap for MSRs {base:#x}+{count} needs {(count + 7) // 8} bytes")
            buf = (ctypes.c_uint8 * len(bitmap)).from_buffer_copy(bitmap)
            keep.append(buf)
            slot.bitmap = ctypes.addressof(buf)
        self.ioctl(abi.KVM_X86_SET_MSR_FILTER, filt)

    def enable_dirty_ring(self, entries: int) -> None:
        """Switch dirty tracking to per-vCPU rings of `entries` kvm_dirty_gfn each
        (KVM_CAP_DIRTY_LOG_RING_ACQ_REL or KVM_CAP_DIRTY_LOG_RING); before any vCPU exists.
        Read them with vcpu.dirty_ring(), then call reset_dirty_rings()."""
        entries = check_int(entries, ctypes.c_uint64, "entries")
        size = entries * ctypes.sizeof(abi.kvm_dirty_gfn)
        if size < PAGE_SIZE or size & (size - 1):
            raise ValueError(f"the dirty ring must be a power-of-two size of at least a page: "
                             f"{PAGE_SIZE // ctypes.sizeof(abi.kvm_dirty_gfn)} entries or more, "
                             f"a power of two (not {entries})")
        for cap in (abi.Capability.DIRTY_LOG_RING_ACQ_REL, abi.Capability.DIRTY_LOG_RING):
            limit = self.check_extension(cap)
            if limit:
                if size > limit:
                    raise ValueError(f"the dirty ring can hold at most "
                                     f"{limit // ctypes.sizeof(abi.kvm_dirty_gfn)} entries")
                self.enable_cap(cap, size)
                self.dirty_ring_entries = entries
                return
        raise KvmUnsupported("a dirty ring", "KVM_CAP_DIRTY_LOG_RING")

    dirty_ring_entries = 0

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: re-protect the pages harvested from every vCPU's ring."""
        return self.ioctl(abi.KVM_RESET_DIRTY_RINGS)

    # -- devices and stats
    def has_device_type(self, device_type: int) -> bool:
        """Whether KVM_CREATE_DEVICE could create this device type here (KVM_CREATE_DEVICE_TEST)."""
        self.require(abi.Capability.DEVICE_CTRL, "KVM_CREATE_DEVICE")
        req = fill(abi.kvm_create_device, {"type": "device_type"}, type=device_type,
                   flags=abi.KVM_CREATE_DEVICE_TEST)
        try:
            self.ioctl(abi.KVM_CREATE_DEVICE, req)
        except KvmError as e:
            if e.errno in (errno.ENODEV, errno.ENOENT, errno.EINVAL, errno.ENOTSUP):
                return False
            raise
        return True

    def create_device(self, device_type: int, flags: int = 0) -> Device:
        """KVM_CREATE_DEVICE (KVM_CAP_DEVICE_CTRL): an in-kernel device with its own fd,
        closed with the VM. (To ask whether a type exists, use has_device_type().)"""
        self.require(abi.Capability.DEVICE_CTRL, "KVM_CREATE_DEVICE")
        req = fill(abi.kvm_create_device, {"type": "device_type"}, type=device_type, flags=flags)
        if req.flags & abi.KVM_CREATE_DEVICE_TEST:
            # With TEST the kernel creates nothing and returns no fd: a Device would wrap
            # whatever fd 0 is and close it with the VM.
            raise ValueError("KVM_CREATE_DEVICE_TEST creates no device; use vm.has_device_type()")
        self.ioctl(abi.KVM_CREATE_DEVICE, req)
        dev = Device(self, req.fd, device_type)
        self._adopt(dev)
        return dev

    def stats(self) -> Stats:
        """The binary statistics fd (KVM_GET_STATS_FD, KVM_CAP_BINARY_STATS_FD); closed with the VM."""
        self.require(abi.Capability.BINARY_STATS_FD, "KVM_GET_STATS_FD")
        stats = Stats(self.ioctl(abi.KVM_GET_STATS_FD))
        self._adopt(stats)
        return stats

    # -- lifetime
    def _release(self) -> BaseException | None:
        # Every step runs even if one before it was interrupted (Ctrl-C while a vCPU is
        # waited for): a half-closed VM would keep slots pointing at memory that garbage
        # collection later unmaps. The first interruption is raised at the end.
        pending: list[BaseException] = []
        with self._vm_lock:           # nothing is being created now, nor after (_closing)
            vcpus = list(self._vcpus.values())


        def kick_all() -> None:       # all at once, so they leave KVM_RUN together
            deadline = time.monotonic() + vcpu_module.CLOSE_TIMEOUT
            for vcpu in vcpus:
                vcpu._close_deadline = deadline      # one wait for all, not one each
                vcpu._stop()

        def close_all_but_memfds() -> None:
            self._close_children(keep=lambda child: isinstance(child, GuestMemfd))

        steps: list[Callable[[], None]] = [kick_all, *(v.close for v in vcpus),
                                           close_all_but_memfds, self._delete_all_slots,
                                           self._close_unmapped_vcpu_fds,
                                           self._close_children]   # guest_memfds last
        for step in steps:
            try:
                step()
            except BaseException as e:
                pending.append(e)
        return pending[0] if pending else None

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

    def _close_unmapped_vcpu_fds(self) -> None:
        with self._vm_lock:
            fds = list(self._unmapped_vcpu_fds.values())
            self._unmapped_vcpu_fds.clear()
        for fd in fds:
            os.close(fd)

    def __repr__(self) -> str:
        if getattr(self, "_closing", True) or not hasattr(self, "_vcpus"):
            return "<Vm closed>"
        return f"<Vm fd={self._fd} vcpus={len(self.vcpus)} slots={len(self.memory.regions)}>"


# Mappings KVM may still reach (deleting their slot failed): kept for the life of the process.
_NEVER_UNMAPPED: list[MemoryRegion] = []
_LIVE_VMS: weakref.WeakSet[Vm] = weakref.WeakSet()


@atexit.register
def _close_all_vms() -> None:
    """At interpreter exit, before modules are torn down: stop every vCPU and delete every
    slot while the machinery to do so still exists."""
    for vm in list(_LIVE_VMS):
        try:
            vm.close()
        except Exception:
            pass
