"""X86Vm: the x86 calls of a VM (irqchip and PIT, kvmclock, MSR filter, real-mode setup)."""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar, cast

from .._layout import check_bool, check_field, check_int, expect, fill
from ..abi import x86_64 as abi
from ..errors import KvmError, KvmUnsupported
from ..memory import MemoryRegion
from . import _hypervisors
from .vcpu import X86Vcpu

if TYPE_CHECKING:
    from ..snapshot import VmState
    from ..vcpu import Vcpu
    from .system import X86Kvm

__all__ = ["X86Vm"]

# KVM_MIN_ALLOC_MMU_PAGES: the kernel refuses a smaller shadow MMU (EINVAL).
_MIN_MMU_PAGES = 64


class X86Vm(_hypervisors.HypervisorVm):
    """A VM on an x86 host: everything Vm does, the x86-only VM ioctls, and X86Vcpu vCPUs."""

    _vcpu_class: ClassVar[type[Vcpu]] = X86Vcpu
    kvm: X86Kvm

    def create_vcpu(self, vcpu_id: int) -> X86Vcpu:
        """KVM_CREATE_VCPU: an X86Vcpu (see Vm.create_vcpu)."""
        return cast(X86Vcpu, super().create_vcpu(vcpu_id))    # _vcpu_class made it

    @property
    def vcpus(self) -> tuple[X86Vcpu, ...]:
        """The open vCPUs, ordered by vCPU id."""
        return cast("tuple[X86Vcpu, ...]", super().vcpus)

    # -- snapshots
    def save_state(self, *, memory: bool = True, track_dirty: bool = False,
                   base: VmState | None = None) -> VmState:
        """Everything needed to run this VM on elsewhere: every vCPU's state, the VM-wide
        state (irqchip, PIT, clock, setup calls) and guest memory (kvm_bindings.snapshot).

        A vCPU stopped at an I/O, MMIO or MSR exit first finishes that instruction (one
        KVM_RUN with immediate_exit; an IN or MMIO read takes what its exit's data holds).
        VcpuBusyError if another thread is running a vCPU: kick() it and let its run()
        return first. memory=False: only the slot table, for memory the caller carries
        (restore_vm(memory=)). track_dirty=True: from now on the dirty log of every slot
        belongs to snapshots, so that save_state(base=this) later saves only the pages
        written since (an incremental snapshot; its own base for the next one).
        SnapshotError for a VM that cannot be saved (guest_memfd memory, aliased slots).
        """
        from . import snapshot
        return snapshot.save_state(self, memory=memory, track_dirty=track_dirty, base=base)

    def load_state(self, state: VmState, *, check_cpu: bool = True) -> None:
        """Put this VM back into a snapshot's state, in place: every vCPU, irqchip, PIT and
        clock in restore_vm()'s order, then guest memory, copied over every slot. For the
        VM the snapshot came from, or one restore_vm() made from it: the same setup calls,
        memory slots (with their flags) and vCPU ids, else SnapshotError before anything
        changes; VcpuBusyError, also before anything changes, if a vCPU is running. No new VM,
        vCPU or mapping: what a fuzzer's reset loop wants. A vCPU stopped at an exit has
        that instruction finished first (its result is then overwritten). Saves and loads
        of one VM take turns. If the kernel refuses part of the state midway
        (RestoreError) the VM is left between states (its memory as it was): close it."""
        from . import snapshot
        snapshot.load_state(self, state, check_cpu=check_cpu)

    # -- system setup
    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: three pages of guest-physical space for the real-mode TSS (Intel)."""
        self.ioctl(abi.KVM_SET_TSS_ADDR, check_int(addr, ctypes.c_ulong, "addr"))
        self._record("tss_addr", "set_tss_addr", addr=addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: one page for the real-mode EPT identity map (Intel)."""
        self.require(abi.Capability.SET_IDENTITY_MAP_ADDR, "KVM_SET_IDENTITY_MAP_ADDR")
        self.ioctl(abi.KVM_SET_IDENTITY_MAP_ADDR,
                   ctypes.c_uint64(check_int(addr, ctypes.c_uint64, "addr")))
        self._record("identity_map_addr", "set_identity_map_addr", addr=addr)

    def set_boot_cpu_id(self, vcpu_id: int) -> None:
        """KVM_SET_BOOT_CPU_ID (KVM_CAP_SET_BOOT_CPU_ID): which vCPU is the bootstrap
        processor (0 unless set); before any vCPU exists."""
        self.require(abi.Capability.SET_BOOT_CPU_ID, "KVM_SET_BOOT_CPU_ID")
        vcpu_id = check_int(vcpu_id, ctypes.c_ulong, "vcpu_id")
        if self.vcpus:
            raise KvmError("KVM_SET_BOOT_CPU_ID", errno.EBUSY,
                           "the boot vCPU must be chosen before any vCPU is created")
        self.ioctl(abi.KVM_SET_BOOT_CPU_ID, vcpu_id)
        self._record("boot_cpu_id", "set_boot_cpu_id", vcpu_id=vcpu_id)

    def set_nr_mmu_pages(self, pages: int) -> None:
        """KVM_SET_NR_MMU_PAGES (KVM_CAP_MMU_SHADOW_CACHE_CONTROL): cap the shadow MMU's
        page-table pages for this VM at `pages` (at least 64; the default grows with guest
        memory). Only shadow paging uses them: under EPT/NPT it changes nothing. A restore
        sets it again."""
        pages = check_int(pages, ctypes.c_ulong, "pages")
        if pages < _MIN_MMU_PAGES:
            raise ValueError(f"set_nr_mmu_pages(): at least {_MIN_MMU_PAGES} pages, not {pages}")
        self.require(abi.Capability.MMU_SHADOW_CACHE_CONTROL, "KVM_SET_NR_MMU_PAGES")
        self.ioctl(abi.KVM_SET_NR_MMU_PAGES, pages)
        self._record("nr_mmu_pages", "set_nr_mmu_pages", pages=pages)

    def get_nr_mmu_pages(self) -> int:
        """KVM_GET_NR_MMU_PAGES (KVM_CAP_MMU_SHADOW_CACHE_CONTROL): the shadow MMU's page
        limit, on kernels that still have the ioctl. Upstream withdrew it (the capability now
        announces only KVM_SET_NR_MMU_PAGES): where the kernel does not know it, KvmError
        (ENOTTY) says so."""
        self.require(abi.Capability.MMU_SHADOW_CACHE_CONTROL, "KVM_GET_NR_MMU_PAGES")
        try:
            return self.ioctl(abi.KVM_GET_NR_MMU_PAGES)
        except KvmError as e:
            # ENOTTY on a VM fd: the kernel has no such ioctl, not a refusal of this VM.
            if e.errno != errno.ENOTTY:
                raise
            raise KvmError("KVM_GET_NR_MMU_PAGES", errno.ENOTTY,
                           "this kernel no longer has the ioctl: it was withdrawn upstream, "
                           "and KVM_CAP_MMU_SHADOW_CACHE_CONTROL now announces only "
                           "KVM_SET_NR_MMU_PAGES; keep the value you set") from None

    # -- memory encryption (SEV, TDX)
    def _encryption_ioctl(self, number: int, name: str, arg: object) -> None:
        try:
            self.ioctl(number, arg, name=name)
        except KvmError as e:
            # KVM says ENOTTY where the host (or this VM's type) has no memory encryption.
            if e.errno != errno.ENOTTY:
                raise
            raise KvmUnsupported(name, "memory encryption (a KVM_X86_SEV_VM, KVM_X86_SNP_VM or "
                                       "KVM_X86_TDX_VM type in KVM_CAP_VM_TYPES)") from None

    def memory_encrypt_op(self, cmd: abi.kvm_sev_cmd | abi.kvm_tdx_cmd) -> None:
        """KVM_MEMORY_ENCRYPT_OP: one SEV (kvm_sev_cmd) or TDX (kvm_tdx_cmd) command, filled in
        by the caller (its data field points at the command's own struct). The kernel writes
        the firmware's status into cmd.error (SEV) or cmd.hw_error (TDX), also on failure.
        KvmUnsupported where the host or the VM's type has no memory encryption."""
        if not isinstance(cmd, (abi.kvm_sev_cmd, abi.kvm_tdx_cmd)):
            raise TypeError(f"memory_encrypt_op() takes a kvm_sev_cmd or kvm_tdx_cmd, not "
                            f"{type(cmd).__name__}")
        self._encryption_ioctl(abi.KVM_MEMORY_ENCRYPT_OP, "KVM_MEMORY_ENCRYPT_OP", cmd)

    def _enc_region(self, region: MemoryRegion, call: str) -> abi.kvm_enc_region:
        live = self._own(region, call)
        return fill(abi.kvm_enc_region, addr=live.host_addr, size=live.size)

    def add_encrypted_region(self, region: MemoryRegion) -> None:
        """KVM_MEMORY_ENCRYPT_REG_REGION: pin this VM's memory region as encrypted guest
        memory (SEV); KvmUnsupported without memory encryption."""
        self._encryption_ioctl(abi.KVM_MEMORY_ENCRYPT_REG_REGION, "KVM_MEMORY_ENCRYPT_REG_REGION",
                               self._enc_region(region, "add_encrypted_region"))

    def remove_encrypted_region(self, region: MemoryRegion) -> None:
        """KVM_MEMORY_ENCRYPT_UNREG_REGION: undo add_encrypted_region()."""
        self._encryption_ioctl(abi.KVM_MEMORY_ENCRYPT_UNREG_REGION,
                               "KVM_MEMORY_ENCRYPT_UNREG_REGION",
                               self._enc_region(region, "remove_encrypted_region"))

    # -- interrupt controllers
    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and local APICs (create vCPUs after)."""
        self.require(abi.Capability.IRQCHIP, "KVM_CREATE_IRQCHIP")
        if self.vcpus:
            raise KvmError("KVM_CREATE_IRQCHIP", errno.EINVAL,
                           "the in-kernel irqchip must be created before any vCPU")
        self.ioctl(abi.KVM_CREATE_IRQCHIP)
        self._record("irqchip", "create_irqchip")

    def get_irqchip(self, chip_id: int) -> abi.kvm_irqchip:
        """KVM_GET_IRQCHIP -> kvm_irqchip (abi.KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE, _IOAPIC)."""
        return self._get(abi.KVM_GET_IRQCHIP, abi.kvm_irqchip, chip_id=chip_id)

    def set_irqchip(self, chip: abi.kvm_irqchip) -> None:
        """KVM_SET_IRQCHIP: one chip's state, as get_irqchip() returned it."""
        self.ioctl(abi.KVM_SET_IRQCHIP, expect(chip, abi.kvm_irqchip, "set_irqchip()"))

    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2: the in-kernel i8254 timer."""
        self.require(abi.Capability.PIT2, "KVM_CREATE_PIT2")
        self._pit_ioctl(abi.KVM_CREATE_PIT2, "KVM_CREATE_PIT2",
                        fill(abi.kvm_pit_config, flags=flags))
        self._record("pit", "create_pit2", flags=flags)

    def get_pit2(self) -> abi.kvm_pit_state2:
        """KVM_GET_PIT2 -> kvm_pit_state2 (after create_pit2())."""
        return self._get(abi.KVM_GET_PIT2, abi.kvm_pit_state2)

    def set_pit2(self, state: abi.kvm_pit_state2) -> None:
        """KVM_SET_PIT2."""
        self.ioctl(abi.KVM_SET_PIT2, expect(state, abi.kvm_pit_state2, "set_pit2()"))

    def create_pit(self) -> None:
        """KVM_CREATE_PIT (KVM_CAP_PIT): the legacy form of create_pit2(), the same in-kernel
        i8254 with KVM_PIT_SPEAKER_DUMMY set. One PIT per VM, made either way, after
        create_irqchip(); get_pit()/set_pit() and get_pit2()/set_pit2() both reach it, and
        snapshots save it through get_pit2() and make it again with create_pit()."""
        self.require(abi.Capability.PIT, "KVM_CREATE_PIT")
        self._pit_ioctl(abi.KVM_CREATE_PIT, "KVM_CREATE_PIT", None)
        self._record("pit", "create_pit")

    def get_pit(self) -> abi.kvm_pit_state:
        """KVM_GET_PIT -> kvm_pit_state (KVM_CAP_PIT): the three channels of the in-kernel
        PIT, without kvm_pit_state2's flags."""
        self.require(abi.Capability.PIT, "KVM_GET_PIT")
        state = abi.kvm_pit_state()
        self._pit_ioctl(abi.KVM_GET_PIT, "KVM_GET_PIT", state)
        return state

    def set_pit(self, state: abi.kvm_pit_state) -> None:
        """KVM_SET_PIT (KVM_CAP_PIT): the three channels, as get_pit() returned them; each
        channel's count is loaded again, so count_load_time is stamped anew."""
        expect(state, abi.kvm_pit_state, "set_pit()")
        self.require(abi.Capability.PIT, "KVM_SET_PIT")
        self._pit_ioctl(abi.KVM_SET_PIT, "KVM_SET_PIT", state)

    def set_pit_reinject(self, enabled: bool) -> None:
        """KVM_REINJECT_CONTROL (KVM_CAP_REINJECT_CONTROL): whether the in-kernel PIT makes
        up the ticks a guest missed (True, the kernel's default) or drops them. Needs the PIT;
        the kernel has no call to read it back. A restore sets it again."""
        check_bool(enabled, "set_pit_reinject()'s enabled")
        self.require(abi.Capability.REINJECT_CONTROL, "KVM_REINJECT_CONTROL")
        self._pit_ioctl(abi.KVM_REINJECT_CONTROL, "KVM_REINJECT_CONTROL",
                        fill(abi.kvm_reinject_control, pit_reinject=int(enabled)))
        self._record("pit_reinject", "set_pit_reinject", enabled=enabled)

    def _pit_ioctl(self, number: int, name: str, arg: object) -> None:
        try:
            self.ioctl(number, arg, name=name)
        except KvmError as e:
            # The kernel's answers without the PIT (ENXIO) or its irqchip (ENOENT).
            if e.errno == errno.ENXIO:
                raise KvmError(name, e.errno, "this VM has no in-kernel PIT: create_pit2() "
                                              "or create_pit() first") from None
            if e.errno == errno.ENOENT:
                raise KvmError(name, e.errno, "the in-kernel PIT needs the in-kernel PIC: "
                                              "create_irqchip() first") from None
            if e.errno == errno.EEXIST:
                raise KvmError(name, e.errno, "this VM has its PIT already (one per VM, "
                                              "from create_pit2() or create_pit())") from None
            raise

    def get_clock(self) -> abi.kvm_clock_data:
        """KVM_GET_CLOCK: the guest's kvmclock (kvm_clock_data)."""
        return self._get(abi.KVM_GET_CLOCK, abi.kvm_clock_data)

    def set_clock(self, clock: abi.kvm_clock_data) -> None:
        """KVM_SET_CLOCK."""
        self.ioctl(abi.KVM_SET_CLOCK, expect(clock, abi.kvm_clock_data, "set_clock()"))

    def set_pmu_event_filter(self, action: int, events: Iterable[int], *,
                             fixed_counter_bitmap: int = 0, flags: int = 0) -> None:
        """KVM_SET_PMU_EVENT_FILTER (KVM_CAP_PMU_EVENT_FILTER): which performance-monitoring
        events the guest's counters may count. action abi.KVM_PMU_EVENT_ALLOW counts only
        the listed events, abi.KVM_PMU_EVENT_DENY all but them; an event is an event-select
        value (event number and unit mask, as the guest writes them to its event-select
        MSR). fixed_counter_bitmap: the fixed counters (Intel) the action applies to, by
        bit. flags abi.KVM_PMU_EVENT_FLAG_MASKED_EVENTS makes each event a masked-event
        pattern (KVM_CAP_PMU_EVENT_MASKED_EVENTS). A new filter replaces the last one (DENY
        with no events lifts it); vCPUs apply it from their next entry. The kernel refuses
        more events than it takes (E2BIG). A restore sets it again."""
        action = check_field(action, abi.kvm_pmu_event_filter, "action")
        if action not in (abi.KVM_PMU_EVENT_ALLOW, abi.KVM_PMU_EVENT_DENY):
            raise ValueError(f"set_pmu_event_filter(): action is KVM_PMU_EVENT_ALLOW or "
                             f"KVM_PMU_EVENT_DENY, not {action}")
        if isinstance(events, (str, bytes, bytearray, memoryview)) or not isinstance(events, Iterable):
            raise TypeError(f"set_pmu_event_filter() takes the events as an iterable of ints, "
                            f"not {type(events).__name__}")
        selectors = [check_int(e, ctypes.c_uint64, f"events[{i}]") for i, e in enumerate(events)]
        filt = abi.kvm_pmu_event_filter.alloc(len(selectors))
        fill(filt, action=action, fixed_counter_bitmap=fixed_counter_bitmap, flags=flags)
        slots = filt.flex_array()
        for i, selector in enumerate(selectors):
            slots[i] = selector
        if flags & ~abi.KVM_PMU_EVENT_FLAGS_VALID_MASK:
            raise ValueError(f"set_pmu_event_filter(): unknown flags {flags:#x}")
        self.require(abi.Capability.PMU_EVENT_FILTER, "KVM_SET_PMU_EVENT_FILTER")
        if flags & abi.KVM_PMU_EVENT_FLAG_MASKED_EVENTS:
            self.require(abi.Capability.PMU_EVENT_MASKED_EVENTS,
                         "KVM_SET_PMU_EVENT_FILTER with KVM_PMU_EVENT_FLAG_MASKED_EVENTS")
        try:
            self.ioctl(abi.KVM_SET_PMU_EVENT_FILTER, filt)
        except KvmError as e:
            if e.errno != errno.E2BIG:
                raise
            raise KvmError("KVM_SET_PMU_EVENT_FILTER", e.errno,
                           f"{len(selectors)} events are more than this kernel takes in one "
                           f"filter") from None
        self._record("pmu_event_filter", "set_pmu_event_filter", action=action,
                     events=selectors, fixed_counter_bitmap=fixed_counter_bitmap, flags=flags)

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
        self._record("msr_filter", "set_msr_filter", default_deny=default_deny,
                     ranges=[(f, b, c, bytes(m)) for f, b, c, m in ranges])
