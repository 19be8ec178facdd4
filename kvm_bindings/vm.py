"""Vm: a "kvm-vm" fd (kvm_vm_ioctl in the kernel)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from typing import TYPE_CHECKING, Any

from . import abi
from ._fd import CapabilityOwner
from .device import DeviceAttributes
from .errors import KvmError, KvmUnsupported
from .memory import PAGE_SIZE, GuestMemory, MemoryRegion

if TYPE_CHECKING:
    from .device import Device
    from .stats import Stats
    from .system import Kvm
    from .vcpu import Vcpu


class Vm(CapabilityOwner, DeviceAttributes):
    """One virtual machine: memory slots, vCPUs, interrupt plumbing, devices.

    Closing the VM closes its vCPUs and devices first, then unmaps its memory.
    """

    def __init__(self, kvm: Kvm, fd: int, vm_type: int = 0) -> None:
        super().__init__(fd)
        self.kvm = kvm
        self.vm_type = vm_type
        self.memory = GuestMemory()
        self._vcpus: dict[int, Vcpu] = {}
        self._devices: list[Device] = []
        self._caps: dict[int, int] = {}
        self._guest_memfds: list[int] = []
        # What the VM needs from /dev/kvm later, asked now: the VM outlives a closed Kvm.
        self.vcpu_mmap_size = kvm.vcpu_mmap_size
        self._ask_vm_fd = bool(kvm.check_extension(abi.Capability.CHECK_EXTENSION_VM))

    # -- capabilities
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd where the kernel supports it, else on /dev/kvm."""
        cap = int(cap)
        if cap not in self._caps:
            if self._ask_vm_fd:
                self._caps[cap] = self.ioctl(abi.KVM_CHECK_EXTENSION, cap)
            else:
                self._caps[cap] = self.kvm.check_extension(cap)
        return self._caps[cap]


    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM with up to four arguments."""
        self.require(abi.Capability.ENABLE_CAP_VM, "KVM_ENABLE_CAP on a VM")
        self.ioctl(abi.KVM_ENABLE_CAP, _enable_cap(cap, args, flags))

    # -- memory
    def _free_slot(self) -> int:
        used = {r.slot for r in self.memory.regions}
        return next(slot for slot in range(len(used) + 1) if slot not in used)

    def add_memory(self, guest_phys_addr: int, size: int, *, readonly: bool = False,
                   log_dirty: bool = False, slot: int | None = None,
                   guest_memfd: int | None = None, guest_memfd_offset: int = 0) -> MemoryRegion:
        """Map anonymous memory and register it as a memory slot at guest_phys_addr.

        readonly: guest writes exit as MMIO (KVM_CAP_READONLY_MEM). log_dirty: track
        written pages for dirty_log(). guest_memfd: back private memory with a
        guest_memfd (KVM_SET_USER_MEMORY_REGION2, KVM_CAP_GUEST_MEMFD).
        """
        if size <= 0 or size % PAGE_SIZE or guest_phys_addr % PAGE_SIZE:
            raise ValueError(f"guest_phys_addr ({guest_phys_addr:#x}) and size ({size:#x}) must be "
                             f"multiples of the page size ({PAGE_SIZE:#x}), size > 0")
        clash = self.memory.overlapping(guest_phys_addr, size)
        if clash is not None:
            raise ValueError(f"{guest_phys_addr:#x}..{guest_phys_addr + size:#x} overlaps {clash!r}")
        flags = 0
        if readonly:
            self.require(abi.Capability.READONLY_MEM, "read-only memory slots")
            flags |= abi.KVM_MEM_READONLY
        if log_dirty:
            flags |= abi.KVM_MEM_LOG_DIRTY_PAGES
        if guest_memfd is not None:
            self.require(abi.Capability.GUEST_MEMFD, "guest_memfd memory")
            flags |= abi.KVM_MEM_GUEST_MEMFD
        backing = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        region = MemoryRegion(self._free_slot() if slot is None else slot, guest_phys_addr, size,
                              flags, backing, guest_memfd, guest_memfd_offset)
        try:
            self._set_region(region)
        except KvmError as e:
            region._unmap()
            limit = self.check_extension(abi.Capability.NR_MEMSLOTS)
            if e.errno == errno.EINVAL and limit and region.slot >= limit:
                raise KvmError(e.ioctl, errno.ENOSPC, f"all {limit} memory slots are in use") from None
            raise
        except BaseException:
            region._unmap()
            raise
        self.memory._add(region)
        return region

    def _set_region(self, region: MemoryRegion, size: int | None = None) -> None:
        size = region.size if size is None else size
        if region.guest_memfd is not None:
            self.require(abi.Capability.USER_MEMORY2, "KVM_SET_USER_MEMORY_REGION2")
            r2 = abi.kvm_userspace_memory_region2(
                slot=region.slot, flags=region.flags, guest_phys_addr=region.guest_phys_addr,
                memory_size=size, userspace_addr=region.host_addr,
                guest_memfd_offset=region.guest_memfd_offset, guest_memfd=region.guest_memfd)
            self.ioctl(abi.KVM_SET_USER_MEMORY_REGION2, r2)
            return
        r = abi.kvm_userspace_memory_region(
            slot=region.slot, flags=region.flags, guest_phys_addr=region.guest_phys_addr,
            memory_size=size, userspace_addr=region.host_addr)
        self.ioctl(abi.KVM_SET_USER_MEMORY_REGION, r)

    def remove_memory(self, region: MemoryRegion) -> None:
        """Delete the memory slot and unmap its memory."""
        self._set_region(region, size=0)
        self.memory._remove(region)
        region._unmap()

    def move_memory(self, region: MemoryRegion, guest_phys_addr: int) -> None:
        """Move a slot to another GPA; its contents stay (KVM deletes and re-creates it)."""
        clash = self.memory.overlapping(guest_phys_addr, region.size)
        if clash is not None and clash is not region:
            raise ValueError(f"{guest_phys_addr:#x} overlaps {clash!r}")
        self._set_region(region, size=0)   # a slot cannot move in place
        self.memory._remove(region)
        old = region.guest_phys_addr
        region.guest_phys_addr = guest_phys_addr
        try:
            self._set_region(region)
        except BaseException:
            region.guest_phys_addr = old
            self._set_region(region)
            raise
        finally:
            self.memory._add(region)

    def set_dirty_logging(self, region: MemoryRegion, enabled: bool) -> None:
        if enabled:
            region.flags |= abi.KVM_MEM_LOG_DIRTY_PAGES
        else:
            region.flags &= ~abi.KVM_MEM_LOG_DIRTY_PAGES
        self._set_region(region)

    def dirty_log(self, region: MemoryRegion) -> list[int]:
        """KVM_GET_DIRTY_LOG: GPAs of the pages written since the last call (which resets it)."""
        if not region.flags & abi.KVM_MEM_LOG_DIRTY_PAGES:
            raise ValueError(f"dirty logging is off for {region!r}; "
                             f"add_memory(..., log_dirty=True) or set_dirty_logging()")
        pages = region.size // PAGE_SIZE
        bitmap = (ctypes.c_uint64 * ((pages + 63) // 64))()
        log = abi.kvm_dirty_log(slot=region.slot)
        log.dirty_bitmap = ctypes.addressof(bitmap)
        self.ioctl(abi.KVM_GET_DIRTY_LOG, log)
        out = []
        for word_index, word in enumerate(bitmap):
            while word:
                bit = (word & -word).bit_length() - 1
                out.append(region.guest_phys_addr + (word_index * 64 + bit) * PAGE_SIZE)
                word &= word - 1
        return out

    def clear_dirty_log(self, region: MemoryRegion, first_page: int = 0,
                        num_pages: int | None = None) -> None:
        """KVM_CLEAR_DIRTY_LOG (needs KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled)."""
        self.require(abi.Capability.MANUAL_DIRTY_LOG_PROTECT2, "KVM_CLEAR_DIRTY_LOG")
        pages = region.size // PAGE_SIZE if num_pages is None else num_pages
        bitmap = (ctypes.c_uint64 * ((pages + 63) // 64))(*([~0 & (2**64 - 1)] * ((pages + 63) // 64)))
        clear = abi.kvm_clear_dirty_log(slot=region.slot, num_pages=pages, first_page=first_page)
        clear.dirty_bitmap = ctypes.addressof(bitmap)
        self.ioctl(abi.KVM_CLEAR_DIRTY_LOG, clear)

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """KVM_CREATE_GUEST_MEMFD: an fd of guest-private memory (closed with the VM)."""
        self.require(abi.Capability.GUEST_MEMFD, "KVM_CREATE_GUEST_MEMFD")
        fd = self.ioctl(abi.KVM_CREATE_GUEST_MEMFD, abi.kvm_create_guest_memfd(size=size, flags=flags))
        self._guest_memfds.append(fd)
        return fd

    def set_memory_attributes(self, address: int, size: int, attributes: int) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES, e.g. KVM_MEMORY_ATTRIBUTE_PRIVATE for a guest_memfd range."""
        self.require(abi.Capability.MEMORY_ATTRIBUTES, "KVM_SET_MEMORY_ATTRIBUTES")
        self.ioctl(abi.KVM_SET_MEMORY_ATTRIBUTES,
                   abi.kvm_memory_attributes(address=address, size=size, attributes=attributes))

    # -- vCPUs
    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU: a "kvm-vcpu" fd with its kvm_run mapped."""
        from .vcpu import Vcpu
        if vcpu_id in self._vcpus and not self._vcpus[vcpu_id].closed:
            raise ValueError(f"vCPU {vcpu_id} already exists")
        fd = self.ioctl(abi.KVM_CREATE_VCPU, vcpu_id)
        vcpu = Vcpu(self, fd, vcpu_id)
        self._vcpus[vcpu_id] = vcpu
        return vcpu

    @property
    def vcpus(self) -> tuple[Vcpu, ...]:
        return tuple(v for v in self._vcpus.values() if not v.closed)

    # -- x86 system setup
    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: three pages of guest-physical space for the real-mode TSS (Intel)."""
        self.ioctl(abi.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: one page for the real-mode EPT identity map (Intel)."""
        self.require(abi.Capability.SET_IDENTITY_MAP_ADDR, "KVM_SET_IDENTITY_MAP_ADDR")
        self.ioctl(abi.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    # -- interrupt controllers
    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and local APICs (create vCPUs after)."""
        self.require(abi.Capability.IRQCHIP, "KVM_CREATE_IRQCHIP")
        if self.vcpus:
            raise KvmError("KVM_CREATE_IRQCHIP", errno.EINVAL,
                           "the in-kernel irqchip must be created before any vCPU")
        self.ioctl(abi.KVM_CREATE_IRQCHIP)

    def get_irqchip(self, chip_id: int) -> Any:
        return self._get(abi.KVM_GET_IRQCHIP, abi.kvm_irqchip, chip_id=chip_id)

    def set_irqchip(self, chip: Any) -> None:
        self.ioctl(abi.KVM_SET_IRQCHIP, chip)

    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2: the in-kernel i8254 timer."""
        self.require(abi.Capability.PIT2, "KVM_CREATE_PIT2")
        self.ioctl(abi.KVM_CREATE_PIT2, abi.kvm_pit_config(flags=flags))

    def get_pit2(self) -> Any:
        return self._get(abi.KVM_GET_PIT2, abi.kvm_pit_state2)

    def set_pit2(self, state: Any) -> None:
        self.ioctl(abi.KVM_SET_PIT2, state)

    def irq_line(self, irq: int, level: int) -> int:
        """Raise or lower a GSI on the in-kernel irqchip; returns the status where the kernel gives one."""
        line = abi.kvm_irq_level(level=level)
        line.irq = irq
        if self.check_extension(abi.Capability.IRQ_INJECT_STATUS):
            self.ioctl(abi.KVM_IRQ_LINE_STATUS, line)
            return int(line.status)
        self.ioctl(abi.KVM_IRQ_LINE, line)
        return 0

    def signal_msi(self, address: int, data: int, flags: int = 0, devid: int = 0) -> int:
        """KVM_SIGNAL_MSI: inject one MSI; > 0 delivered, 0 blocked by the guest."""
        self.require(abi.Capability.SIGNAL_MSI, "KVM_SIGNAL_MSI")
        msi = abi.kvm_msi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data,
                          flags=flags, devid=devid)
        return self.ioctl(abi.KVM_SIGNAL_MSI, msi)

    def set_gsi_routing(self, entries: list[Any]) -> None:
        """KVM_SET_GSI_ROUTING: replace the whole routing table with these kvm_irq_routing_entry."""
        self.require(abi.Capability.IRQ_ROUTING, "KVM_SET_GSI_ROUTING")
        table = abi.kvm_irq_routing.alloc(len(entries))
        for slot, entry in zip(table.flex_array(), entries):
            ctypes.memmove(ctypes.addressof(slot), ctypes.addressof(entry), ctypes.sizeof(slot))
        self.ioctl(abi.KVM_SET_GSI_ROUTING, table)

    def irqfd(self, eventfd: int, gsi: int, resample_fd: int | None = None) -> None:
        """KVM_IRQFD: a write to eventfd raises gsi; with resample_fd, a level interrupt
        whose EOI signals resample_fd."""
        self.require(abi.Capability.IRQFD, "KVM_IRQFD")
        flags = 0
        req = abi.kvm_irqfd(fd=eventfd, gsi=gsi)
        if resample_fd is not None:
            self.require(abi.Capability.IRQFD_RESAMPLE, "KVM_IRQFD with resample")
            flags |= abi.KVM_IRQFD_FLAG_RESAMPLE
            req.resamplefd = resample_fd
        req.flags = flags
        self.ioctl(abi.KVM_IRQFD, req)

    def irqfd_remove(self, eventfd: int, gsi: int) -> None:
        self.ioctl(abi.KVM_IRQFD, abi.kvm_irqfd(fd=eventfd, gsi=gsi, flags=abi.KVM_IRQFD_FLAG_DEASSIGN))

    def _ioeventfd(self, eventfd: int, addr: int, length: int, datamatch: int | None, pio: bool,
                   extra: int) -> None:
        self.require(abi.Capability.IOEVENTFD, "KVM_IOEVENTFD")
        flags = extra
        if pio:
            flags |= abi.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= abi.KVM_IOEVENTFD_FLAG_DATAMATCH
        self.ioctl(abi.KVM_IOEVENTFD, abi.kvm_ioeventfd(
            datamatch=datamatch or 0, addr=addr, len=length, fd=eventfd, flags=flags))

    def ioeventfd(self, eventfd: int, addr: int, length: int, *, datamatch: int | None = None,
                  pio: bool = False) -> None:
        """KVM_IOEVENTFD: guest writes to addr (MMIO, or a port with pio=True) signal eventfd
        instead of exiting; with datamatch, only writes of that value."""
        self._ioeventfd(eventfd, addr, length, datamatch, pio, 0)

    def ioeventfd_remove(self, eventfd: int, addr: int, length: int, *,
                         datamatch: int | None = None, pio: bool = False) -> None:
        self._ioeventfd(eventfd, addr, length, datamatch, pio, abi.KVM_IOEVENTFD_FLAG_DEASSIGN)

    def register_coalesced_mmio(self, addr: int, size: int, *, pio: bool = False) -> None:
        """Buffer guest writes to this range in the coalesced ring instead of exiting."""
        if pio:
            self.require(abi.Capability.COALESCED_PIO, "coalesced PIO")
        else:
            self.require(abi.Capability.COALESCED_MMIO, "coalesced MMIO")
        zone = abi.kvm_coalesced_mmio_zone(addr=addr, size=size)
        zone.pio = int(pio)
        self.ioctl(abi.KVM_REGISTER_COALESCED_MMIO, zone)

    def unregister_coalesced_mmio(self, addr: int, size: int, *, pio: bool = False) -> None:
        zone = abi.kvm_coalesced_mmio_zone(addr=addr, size=size)
        zone.pio = int(pio)
        self.ioctl(abi.KVM_UNREGISTER_COALESCED_MMIO, zone)

    def get_clock(self) -> Any:
        """KVM_GET_CLOCK: the guest's kvmclock (kvm_clock_data)."""
        return self._get(abi.KVM_GET_CLOCK, abi.kvm_clock_data)

    def set_clock(self, clock: Any) -> None:
        self.ioctl(abi.KVM_SET_CLOCK, clock)

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
            if len(bitmap) * 8 < count:
                raise ValueError(f"the bitmap for MSRs {base:#x}+{count} needs {(count + 7) // 8} bytes")
            buf = (ctypes.c_uint8 * len(bitmap)).from_buffer_copy(bitmap)
            keep.append(buf)
            slot.flags, slot.base, slot.nmsrs = flags, base, count
            slot.bitmap = ctypes.addressof(buf)
        self.ioctl(abi.KVM_X86_SET_MSR_FILTER, filt)

    def enable_dirty_ring(self, entries: int) -> None:
        """Switch dirty tracking to per-vCPU rings of `entries` kvm_dirty_gfn each
        (KVM_CAP_DIRTY_LOG_RING_ACQ_REL or KVM_CAP_DIRTY_LOG_RING); before any vCPU exists.
        Read them with vcpu.dirty_ring(), then call reset_dirty_rings()."""
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
    def create_device(self, device_type: int, flags: int = 0) -> Device:
        """KVM_CREATE_DEVICE (KVM_CAP_DEVICE_CTRL): an in-kernel device with its own fd."""
        from .device import Device
        self.require(abi.Capability.DEVICE_CTRL, "KVM_CREATE_DEVICE")
        req = abi.kvm_create_device(type=device_type, flags=flags)
        self.ioctl(abi.KVM_CREATE_DEVICE, req)
        dev = Device(self, req.fd, device_type)
        self._devices.append(dev)
        return dev

    def stats(self) -> Stats:
        """The binary statistics fd (KVM_GET_STATS_FD, KVM_CAP_BINARY_STATS_FD)."""
        from .stats import Stats
        self.require(abi.Capability.BINARY_STATS_FD, "KVM_GET_STATS_FD")
        return Stats(self.ioctl(abi.KVM_GET_STATS_FD))

    # -- lifetime
    def _release(self) -> None:
        for vcpu in list(self._vcpus.values()):
            vcpu.close()
        for dev in self._devices:
            dev.close()
        for region in self.memory.regions:
            self.memory._remove(region)
            region._unmap()
        for fd in self._guest_memfds:
            os.close(fd)
        self._guest_memfds.clear()

    def __repr__(self) -> str:
        if self.closed:
            return "<Vm closed>"
        return f"<Vm fd={self._fd} vcpus={len(self.vcpus)} slots={len(self.memory.regions)}>"


def _enable_cap(cap: int, args: tuple[int, ...], flags: int) -> Any:
    if len(args) > 4:
        raise ValueError("KVM_ENABLE_CAP takes at most four arguments")
    req = abi.kvm_enable_cap(cap=int(cap), flags=flags)
    for i, a in enumerate(args):
        req.args[i] = a
    return req
