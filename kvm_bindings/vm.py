"""Vm: a "kvm-vm" fd (kvm_vm_ioctl in the kernel)."""

from __future__ import annotations

import atexit
import ctypes
import errno
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from . import _requests, abi
from . import vcpu as vcpu_module
from ._fd import anon_inode_name, check_same_process, check_unowned
from ._layout import check_int, expect, fill
from .device import Device, DeviceAttributes
from .errors import KvmError, KvmUnsupported
from .memory import PAGE_SIZE, GuestMemfd, GuestMemory, SlotTable
from .slots import MemorySlots
from .stats import Stats
from .vcpu import Vcpu, map_run_page

if TYPE_CHECKING:
    from .snapshot import VmState
    from .system import Kvm

__all__ = ["Vm"]

_V = TypeVar("_V", bound="Vm")


def _no_snapshots(vm_class: type) -> NotImplementedError:
    return NotImplementedError(
        f"snapshots are implemented for x86_64 VMs; {vm_class.__name__}'s state (its "
        f"KVM_GET_REG_LIST registers and interrupt controller) is not saved by this version")


class Vm(MemorySlots, DeviceAttributes):
    """One virtual machine: memory slots, vCPUs, interrupt plumbing, devices.

    Closing the VM stops and closes its vCPUs (kicking any that are running), closes
    its devices, deletes every memory slot in KVM and only then unmaps the memory:
    the guest can never reach host memory the process has reused.
    """

    #: What create_vcpu() makes: an arch's Vm names its own Vcpu class.
    _vcpu_class: ClassVar[type[Vcpu]] = Vcpu

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
        # For save_state(): the setup calls a restore replays (latest per key, in the order
        # made), the eventfd wiring it lists, and the dirty-tracking epoch of the last
        # tracked snapshot (None once anyone else reads the dirty log).
        self._setup: dict[object, tuple[str, dict[str, Any]]] = {}
        self._wiring: dict[tuple[object, ...], tuple[str, dict[str, Any]]] = {}
        self._snapshot_epoch: str | None = None
        self._snapshot_lock = threading.Lock()      # save_state() and load_state() in turn
        _LIVE_VMS.add(self)
        try:
            # What the VM needs from /dev/kvm later, asked now: the VM outlives a closed Kvm.
            self.vcpu_mmap_size = kvm.get_vcpu_mmap_size()
            self._ask_vm_fd = bool(kvm.check_extension(abi.Capability.CHECK_EXTENSION_VM))
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_fd(cls: type[_V], kvm: Kvm, fd: int, vm_type: int = 0) -> _V:
        """A Vm for an open "kvm-vm" fd this process created (KVM_CREATE_VM elsewhere in it:
        C code, another library); of kvm's arch Vm class.

        From then on the Vm owns fd and closes it: dup() it first to keep one of yours. If
        fd is not a VM fd, or kvm is closed, it raises and fd stays yours, open.

        KVM answers a VM's ioctls only in the process that created it: a VM fd received
        from another process is refused (KvmError, EIO); send /dev/kvm instead.

        What an adopted VM does not know, because the kernel cannot be asked: memory slots
        registered before (vm.memory is empty, and add_memory() may pick a slot number in
        use: pass slot=), vCPUs made before (adopt their fds with Vcpu.from_fd), devices,
        irqfds and the dirty ring; vm_type is what the creator passed to KVM_CREATE_VM.
        """
        from .system import Kvm
        if not isinstance(kvm, Kvm):
            raise TypeError(f"Vm.from_fd() takes the Kvm the VM came from, not "
                            f"{type(kvm).__name__}")
        fd = check_int(fd, ctypes.c_int, "fd")
        name = anon_inode_name(fd)
        if name != "anon_inode:kvm-vm":
            raise ValueError(f"fd {fd} is {name}, not a KVM VM fd (anon_inode:kvm-vm)")
        check_same_process(fd, "VM")
        check_unowned(fd)
        # What __init__ asks /dev/kvm, asked before fd is taken: a closed kvm refuses here.
        kvm.get_vcpu_mmap_size()
        kvm.check_extension(abi.Capability.CHECK_EXTENSION_VM)
        vm_class = kvm._vm_class if issubclass(kvm._vm_class, cls) else cls
        return vm_class(kvm, fd, vm_type)

    # -- capabilities
    def _ask_extension(self, cap: int) -> int:
        """On the VM fd where the kernel supports it (KVM_CAP_CHECK_EXTENSION_VM), else on
        /dev/kvm."""
        if self._ask_vm_fd:
            return super()._ask_extension(cap)
        return self.kvm.check_extension(cap)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM with up to four arguments; KvmUnsupported naming cap if
        this kernel does not report it (KVM_CHECK_EXTENSION says 0)."""
        self.require(abi.Capability.ENABLE_CAP_VM, "KVM_ENABLE_CAP on a VM")
        req = _requests.enable_cap(cap, args, flags)
        self.require(req.cap, "KVM_ENABLE_CAP")
        self.ioctl(abi.KVM_ENABLE_CAP, req)
        self._record(("enable_cap", int(req.cap)), "enable_cap",
                     cap=int(req.cap), args=[int(a) for a in req.args[:len(args)]], flags=flags)

    def _record(self, key: object, call: str, **kwargs: Any) -> None:
        """Note a setup call that restoring a snapshot of this VM makes again (the latest
        one per key, in the order they were last made)."""
        self._setup.pop(key, None)
        self._setup[key] = (call, kwargs)

    # -- snapshots (an arch's Vm saves and loads its own state)
    def save_state(self, *, memory: bool = True, track_dirty: bool = False,
                   base: VmState | None = None) -> VmState:
        """Every vCPU's and the VM's state and guest memory (kvm_bindings.snapshot): x86_64
        VMs only in this version; NotImplementedError naming what is missing elsewhere."""
        raise _no_snapshots(type(self))

    def load_state(self, state: VmState, *, check_cpu: bool = True) -> None:
        """Put this VM back into a snapshot's state in place: x86_64 VMs only (see
        save_state)."""
        raise _no_snapshots(type(self))

    # -- vCPUs
    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU: a "kvm-vcpu" fd with its kvm_run mapped.

        vcpu_id must be below KVM_CAP_MAX_VCPU_ID. If the process is out of file
        descriptors nothing is created; if the kvm_run mapping fails after KVM made the
        vCPU, the fd is kept and create_vcpu(vcpu_id) tries the mapping again.
        """
        vcpu_id = check_int(vcpu_id, ctypes.c_ulong, "vcpu_id")
        limit = self.check_extension(abi.Capability.MAX_VCPU_ID) or self.kvm.max_vcpus()
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
            vcpu = self._vcpu_class(self, fd, vcpu_id, page)
            with self._lock:
                if not self._closing:
                    self._vcpus[vcpu_id] = vcpu
                    return vcpu
            vcpu.close()                   # the VM was closed meanwhile: nothing escapes it
            raise self._stale()

    def _adopt_vcpu_fd(self, fd: int, vcpu_id: int | None) -> Vcpu:
        """Vcpu.from_fd(): check fd, map its kvm_run page, and only then own it."""
        fd = check_int(fd, ctypes.c_int, "fd")
        name = anon_inode_name(fd)
        prefix = "anon_inode:kvm-vcpu"
        rest = name[len(prefix):]
        if not name.startswith(prefix) or not (rest == "" or rest[:1] == ":" and rest[1:].isdigit()):
            raise ValueError(f"fd {fd} is {name}, not a KVM vCPU fd (anon_inode:kvm-vcpu:N)")
        # The kernel names the vCPU's id after a colon (older kernels leave it to the caller).
        named = int(rest[1:]) if rest else None
        if vcpu_id is None:
            if named is None:
                raise ValueError(f"fd {fd} ({name}) does not say its vCPU id: pass vcpu_id")
            vcpu_id = named
        vcpu_id = check_int(vcpu_id, ctypes.c_ulong, "vcpu_id")
        if named is not None and named != vcpu_id:
            raise ValueError(f"fd {fd} is vCPU {named}, not vCPU {vcpu_id}")
        check_same_process(fd, "vCPU")
        check_unowned(fd)
        with self._vm_lock:
            self.fd  # noqa: B018 - a closed VM adopts nothing
            if vcpu_id in self._vcpus and not self._vcpus[vcpu_id].closed:
                raise ValueError(f"vCPU {vcpu_id} already has an open Vcpu in {self!r}")
            page = map_run_page(fd, self.vcpu_mmap_size)   # fails: fd is still the caller's
            with self._lock:
                if self._closing:
                    # The VM was closed meanwhile: the fd was never taken, and stays the caller's.
                    page.close()
                    raise self._stale()
                vcpu = self._vcpu_class(self, fd, vcpu_id, page)
                self._vcpus[vcpu_id] = vcpu
                return vcpu

    @property
    def vcpus(self) -> tuple[Vcpu, ...]:
        """The open vCPUs, ordered by vCPU id."""
        return tuple(v for _, v in sorted(self._vcpus.items()) if not v.closed)

    def set_irq_line(self, irq: int, level: int) -> int:
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

    def set_gsi_routing(self, entries: list[abi.kvm_irq_routing_entry]) -> None:
        """KVM_SET_GSI_ROUTING: replace the whole routing table with these kvm_irq_routing_entry."""
        self.require(abi.Capability.IRQ_ROUTING, "KVM_SET_GSI_ROUTING")
        entries = [expect(e, abi.kvm_irq_routing_entry, "set_gsi_routing() entries") for e in entries]
        table = abi.kvm_irq_routing.alloc(len(entries))
        for slot, entry in zip(table.flex_array(), entries):
            ctypes.memmove(ctypes.addressof(slot), ctypes.addressof(entry), ctypes.sizeof(slot))
        self.ioctl(abi.KVM_SET_GSI_ROUTING, table)
        self._record("gsi_routing", "set_gsi_routing",
                     entries=[type(e).from_buffer_copy(e) for e in table.flex_array()])

    def add_irqfd(self, eventfd: int, gsi: int, resample_fd: int | None = None) -> None:
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
        self._wiring[("irqfd", eventfd, gsi)] = ("irqfd", {"gsi": gsi,
                                                          "resample": resample_fd is not None})

    def remove_irqfd(self, eventfd: int, gsi: int) -> None:
        """KVM_IRQFD with KVM_IRQFD_FLAG_DEASSIGN: undo add_irqfd()."""
        self.ioctl(abi.KVM_IRQFD, fill(abi.kvm_irqfd, {"fd": "eventfd"}, fd=eventfd, gsi=gsi,
                                       flags=abi.KVM_IRQFD_FLAG_DEASSIGN))
        self._wiring.pop(("irqfd", eventfd, gsi), None)

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
        key = ("ioeventfd", eventfd, addr, length, datamatch, pio)
        if extra & abi.KVM_IOEVENTFD_FLAG_DEASSIGN:
            self._wiring.pop(key, None)
        else:
            self._wiring[key] = ("ioeventfd", {"addr": addr, "length": length,
                                               "datamatch": datamatch, "pio": pio})

    def add_ioeventfd(self, eventfd: int, addr: int, length: int, *, datamatch: int | None = None,
                  pio: bool = False) -> None:
        """KVM_IOEVENTFD: guest writes to addr (MMIO, or a port with pio=True) signal eventfd
        instead of exiting; with datamatch, only writes of that value."""
        self._ioeventfd(eventfd, addr, length, datamatch, pio, 0)

    def remove_ioeventfd(self, eventfd: int, addr: int, length: int, *,
                         datamatch: int | None = None, pio: bool = False) -> None:
        """KVM_IOEVENTFD with KVM_IOEVENTFD_FLAG_DEASSIGN: undo add_ioeventfd()."""
        self._ioeventfd(eventfd, addr, length, datamatch, pio, abi.KVM_IOEVENTFD_FLAG_DEASSIGN)

    def _coalesced_zone(self, addr: int, size: int, pio: bool) -> abi.kvm_coalesced_mmio_zone:
        return fill(abi.kvm_coalesced_mmio_zone, addr=addr, size=size, pio=int(pio))

    def add_coalesced_mmio(self, addr: int, size: int, *, pio: bool = False) -> None:
        """KVM_REGISTER_COALESCED_MMIO: buffer guest writes to this range (MMIO, or ports with
        pio=True) in the coalesced ring instead of exiting; drain it with
        vcpu.drain_coalesced_mmio()."""
        if pio:
            self.require(abi.Capability.COALESCED_PIO, "coalesced PIO")
        else:
            self.require(abi.Capability.COALESCED_MMIO, "coalesced MMIO")
        self.ioctl(abi.KVM_REGISTER_COALESCED_MMIO, self._coalesced_zone(addr, size, pio))
        self._record(("coalesced", addr, size, pio), "add_coalesced_mmio",
                     addr=addr, size=size, pio=pio)

    def remove_coalesced_mmio(self, addr: int, size: int, *, pio: bool = False) -> None:
        """KVM_UNREGISTER_COALESCED_MMIO: undo add_coalesced_mmio()."""
        self.ioctl(abi.KVM_UNREGISTER_COALESCED_MMIO, self._coalesced_zone(addr, size, pio))
        self._setup.pop(("coalesced", addr, size, pio), None)

    def enable_dirty_ring(self, entries: int) -> None:
        """Switch dirty tracking to per-vCPU rings of `entries` kvm_dirty_gfn each
        (KVM_CAP_DIRTY_LOG_RING_ACQ_REL or KVM_CAP_DIRTY_LOG_RING); before any vCPU exists.
        Read them with vcpu.harvest_dirty_ring(), then call reset_dirty_rings()."""
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
                self._setup.pop(("enable_cap", int(cap)), None)
                self._record("dirty_ring", "enable_dirty_ring", entries=entries)
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

    def open_stats(self) -> Stats:
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
                vcpu._halted = True                  # before the kick: run() sees it after EINTR
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
