"""Saving an x86 VM: which ioctls hold its state.

X86Vm.save_state() is save_state() here; restore_vm() and load_state(), which put the
state back in the order the kernel needs (with the reasons), are kvm_bindings.x86._restore's,
named here too. The format is kvm_bindings.snapshot's.

What is saved, per vCPU: regs, sregs2 (else sregs), the XSAVE area sized by
KVM_CAP_XSAVE2 (else xsave, else fpu), xcrs, debugregs, the LAPIC (with an
in-kernel irqchip), mp_state, vcpu_events, CPUID, every MSR KVM_GET_MSR_INDEX_LIST names
that KVM lets us read, the TSC frequency, nested state (KVM_CAP_NESTED_STATE), the
kvm_run fields a VMM sets (request_interrupt_window, kvm_valid_regs) and the vCPU's
KVM_ENABLE_CAP calls. VM-wide: the VM type and setup calls (capabilities, irqchip, PIT,
TSS and identity-map addresses, MSR filter, GSI routing, coalesced zones), PIC master and
slave, IOAPIC, PIT2, kvmclock, memory slots and their contents, and the irqfd and
ioeventfd registrations as a list for the caller (the eventfds are the caller's).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
import uuid
from typing import TYPE_CHECKING, Any

from ..abi import x86_64 as abi
from ..backing import Backing
from ..errors import SnapshotError, StaleHandleError
from ..memory import PAGE_SIZE
from ..snapshot import MemorySlotState, VcpuState, VmState, host_facts, iter_runs
from . import _cpuid, mce
from ._restore import load_state, restore_vm
from ._snapshot_common import _CHIPS, _MSR_BATCH, ARCH, _all_stopped, _calls, _complete_pending

if TYPE_CHECKING:
    from .vcpu import X86Vcpu
    from .vm import X86Vm

__all__ = ["load_state", "restore_vm", "save_state"]


# ---- saving -------------------------------------------------------------------------------

def _read_msrs(vcpu: X86Vcpu, indices: list[int]) -> tuple[list[list[int]], list[int]]:
    """Every MSR in indices KVM lets us read, in batches; KVM_GET_MSRS stops at the first it
    refuses, which is noted and stepped over."""
    values: list[list[int]] = []
    refused: list[int] = []
    for start in range(0, len(indices), _MSR_BATCH):
        todo = indices[start:start + _MSR_BATCH]
        while todo:
            got = vcpu.get_msrs(todo)
            values.extend([i, got[i]] for i in todo[:len(got)])
            if len(got) < len(todo):
                refused.append(todo[len(got)])
            todo = todo[len(got) + 1:]
    return values, refused


def _get_cpuid(vcpu: X86Vcpu) -> abi.kvm_cpuid2:
    """KVM_GET_CPUID2 with room for however many entries were set."""
    cpuid = _cpuid.grown(lambda c: vcpu.ioctl(abi.KVM_GET_CPUID2, c), 64, 1 << 12, factor=4)
    # Keep only the entries KVM filled in (nent), not the room asked for.
    out = abi.kvm_cpuid2.alloc(cpuid.nent)
    for dst, src in zip(out.flex_array(), cpuid.flex_array()):
        ctypes.memmove(ctypes.addressof(dst), ctypes.addressof(src), ctypes.sizeof(src))
    return out


def _save_vcpu(vcpu: X86Vcpu, msr_indices: list[int], irqchip: bool) -> VcpuState:
    vm = vcpu.vm
    has = vm.check_extension
    s: dict[str, Any] = {}
    v: dict[str, Any] = {}
    # The order matters little for reading (the vCPU is stopped); events first, as the
    # kernel's own state test does, before any read could change what is pending.
    if has(abi.Capability.VCPU_EVENTS):
        s["vcpu_events"] = vcpu.get_vcpu_events()
    if has(abi.Capability.MP_STATE):
        v["mp_state"] = int(vcpu.get_mp_state())
    s["regs"] = vcpu.get_regs()
    if has(abi.Capability.SREGS2):
        s["sregs2"] = vcpu.get_sregs2()
    else:
        s["sregs"] = vcpu.get_sregs()
    if has(abi.Capability.XSAVE2):
        s["xsave"] = vcpu.get_xsave2()
    elif has(abi.Capability.XSAVE):
        s["xsave"] = vcpu.get_xsave()
    else:
        s["fpu"] = vcpu.get_fpu()
    if has(abi.Capability.XCRS):
        s["xcrs"] = vcpu.get_xcrs()
    if has(abi.Capability.DEBUGREGS):
        s["debugregs"] = vcpu.get_debugregs()
    if irqchip:
        s["lapic"] = vcpu.get_lapic()
    s["cpuid"] = _get_cpuid(vcpu)
    if has(abi.Capability.MCE):
        # IA32_MCG_CAP is read-only (setup_mce() sets it) and the banks' MSRs are in no index
        # list: both saved here, so that an injected error and the bank count survive.
        mcg_cap = vcpu.get_msrs([mce.MSR_IA32_MCG_CAP]).get(mce.MSR_IA32_MCG_CAP)
        if mcg_cap is not None:
            v["mcg_cap"] = mcg_cap
            msr_indices = msr_indices + list(range(mce.msr_mc_ctl(0),
                                                   mce.msr_mc_ctl(mcg_cap & mce.MCG_CAP_COUNT)))
    v["msrs"], v["msrs_refused"] = _read_msrs(vcpu, msr_indices)
    if has(abi.Capability.GET_TSC_KHZ):
        v["tsc_khz"] = vcpu.get_tsc_khz()
    if vcpu._vapic_addr or vcpu._tpr_reporting:
        v["vapic"] = {"addr": vcpu._vapic_addr, "tpr_access_reporting": vcpu._tpr_reporting}
    if has(abi.Capability.NESTED_STATE):
        nested = vcpu.get_nested_state()
        # Keep the bytes the kernel says it wrote (size), not the room it was given.
        used = max(ctypes.sizeof(abi.kvm_nested_state), int(nested.size))
        buf = (ctypes.c_uint8 * used).from_buffer_copy(
            (ctypes.c_uint8 * used).from_address(ctypes.addressof(nested)))
        s["nested_state"] = abi.kvm_nested_state.from_buffer(buf)
    run = vcpu.kvm_run
    v["run"] = {"request_interrupt_window": int(run.request_interrupt_window),
                "kvm_valid_regs": int(run.kvm_valid_regs)}
    v["setup"] = _calls(vcpu._setup)
    return VcpuState(vcpu.id, s, v)


def _slot_states(vm: X86Vm, memory: bool, base: VmState | None, track: bool,
                 epoch: str | None) -> tuple[MemorySlotState, ...]:
    regions = vm.memory.regions
    backings: dict[object, list[tuple[int, int, int]]] = {}
    for r in regions:
        if r.guest_memfd is not None:
            raise SnapshotError(f"{r!r} is backed by a guest_memfd, whose private memory the "
                                f"host cannot read: such a VM cannot be saved")
        # Two backings over one file (or memfd) share bytes as one backing does.
        key, base_offset = _backing_identity(r.backing)
        spans = backings.setdefault(key, [])
        offset = base_offset + r.offset
        for start, end, slot in spans:
            if offset < end and start < offset + r.size:
                raise SnapshotError(f"memory slots {slot} and {r.slot} map the same bytes of one "
                                    f"backing (an alias): saving them as two copies would "
                                    f"break what the guest sees, so this VM is refused")
        spans.append((offset, offset + r.size, r.slot))
    if base is not None:
        return _increment(vm, regions, base, epoch)
    out = []
    manual = _manual_protect(vm)
    for r in regions:
        if track:
            if not r.flags & abi.KVM_MEM_LOG_DIRTY_PAGES:
                vm.set_dirty_logging(r, True)
            _take_dirty(vm, r, manual)     # the log now starts at this snapshot
        data = _copy(r.view()) if memory else None
        out.append(MemorySlotState(r.slot, r.guest_phys_addr, r.size, r.flags, data))
    return tuple(out)


def _backing_identity(backing: Backing) -> tuple[object, int]:
    """What a backing maps: the file (device, inode) and where in it, for a shared file or
    memfd; else the backing itself (a private mapping shares nothing with another one)."""
    fd = backing._fd
    if fd is not None and backing.kind in ("memfd", "file"):
        st = os.fstat(fd)
        return ("file", st.st_dev, st.st_ino), backing.file_offset
    return ("backing", id(backing)), 0


def _copy(view: memoryview) -> memoryview:
    """A copy of guest memory, in memory allocated in one go (MAP_POPULATE): page-by-page
    first-touch faults would cost more than the copy itself."""
    copy = mmap.mmap(-1, view.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_POPULATE)
    out = memoryview(copy)
    out[:] = view
    return out


def _manual_protect(vm: X86Vm) -> bool:
    """Is KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 on: does reading the log leave it set?"""
    call = vm._setup.get(("enable_cap", int(abi.Capability.MANUAL_DIRTY_LOG_PROTECT2)))
    return call is not None and bool(call[1]["args"] and call[1]["args"][0])


def _take_dirty(vm: X86Vm, region: Any, manual: bool) -> list[int]:
    """The page indexes of region written since the log was last taken; resets the log."""
    bitmap = vm.get_dirty_log(region)
    pages = [(gpa - region.guest_phys_addr) // PAGE_SIZE for gpa in bitmap]
    if manual and pages:
        vm.clear_dirty_log(region, bitmap)
    return pages


def _increment(vm: X86Vm, regions: tuple[Any, ...], base: VmState,
               epoch: str | None) -> tuple[MemorySlotState, ...]:
    tracking = base.values.get("tracking")
    if not tracking or tracking != epoch:
        raise SnapshotError(
            "an incremental snapshot needs its base to be this VM's latest snapshot taken "
            "with track_dirty=True (or the latest incremental one), with nobody reading the "
            "dirty log since: otherwise pages written meanwhile would be missed")
    layout = [(m.slot, m.guest_phys_addr, m.size) for m in base.memory]
    if layout != [(r.slot, r.guest_phys_addr, r.size) for r in regions]:
        raise SnapshotError("the VM's memory slots changed since the base snapshot: take a "
                            "full snapshot")
    manual = _manual_protect(vm)
    out = []
    for r in regions:
        view = r.view()
        runs: list[tuple[int, bytes | memoryview]] = [
            (first * PAGE_SIZE, bytes(view[first * PAGE_SIZE:(first + n) * PAGE_SIZE]))
            for first, n in iter_runs(_take_dirty(vm, r, manual))]
        out.append(MemorySlotState(r.slot, r.guest_phys_addr, r.size, r.flags, None, runs))
    return tuple(out)


def save_state(vm: X86Vm, *, memory: bool = True, track_dirty: bool = False,
               base: VmState | None = None) -> VmState:
    """See X86Vm.save_state."""
    vm.fd  # noqa: B018 - a closed VM refuses before anything else
    if vm.dirty_ring_entries and (track_dirty or base is not None):
        raise SnapshotError("incremental snapshots use the dirty log, and this VM tracks dirty "
                            "pages with the dirty ring instead")
    try:
        msr_indices = vm.kvm.get_msr_index_list()
    except StaleHandleError:
        raise StaleHandleError("save_state() asks /dev/kvm which MSRs to save: keep the Kvm "
                               "that made this VM open") from None
    unsaved = sorted(vm._unsaved) + [f"vcpu {v.id}: {c}" for v in vm.vcpus for c in sorted(v._unsaved)]
    if unsaved:
        raise SnapshotError(f"this VM has state snapshots do not carry in this version (Xen HVM "
                            f"emulation, Hyper-V eventfds): {', '.join(unsaved)}; a restore "
                            f"would come back without it")
    setup = _calls(vm._setup)
    irqchip = any(c == "create_irqchip" for c, _ in setup)
    split = any(c == "enable_cap" and a["cap"] == abi.Capability.SPLIT_IRQCHIP for c, a in setup)
    closed = sorted(i for i, v in vm._vcpus.items() if v.closed)
    if closed:
        raise SnapshotError(f"vCPU {closed[0]} was closed: KVM keeps a vCPU for as long as "
                            f"its VM lives, but its state can no longer be read, so this VM "
                            f"cannot be saved whole")
    with vm._snapshot_lock:
        with _all_stopped(vm):
            pass        # a busy vCPU refuses before a pending exit is finished anywhere
        for vcpu in vm.vcpus:
            _complete_pending(vcpu)
        return _save_stopped(vm, memory, track_dirty, base, setup, msr_indices, irqchip, split)


def _save_stopped(vm: X86Vm, memory: bool, track_dirty: bool, base: VmState | None,
                  setup: list[list[Any]], msr_indices: list[int], irqchip: bool,
                  split: bool) -> VmState:
    """save_state() once no exit is pending: every vCPU's gate held throughout."""
    with _all_stopped(vm) as vcpus:
        epoch = vm._snapshot_epoch
        values: dict[str, Any] = {"type": vm.vm_type, "setup": setup}
        structs: dict[str, Any] = {}
        if irqchip:
            for name, chip in _CHIPS:
                structs[name] = vm.get_irqchip(chip)
        # KVM_GET_PIT2 reads the PIT whichever call made it (create_pit is create_pit2 with
        # KVM_PIT_SPEAKER_DUMMY); the restore makes it with the same call.
        if any(c in ("create_pit2", "create_pit") for c, _ in setup):
            structs["pit2"] = vm.get_pit2()
        if vm.check_extension(abi.Capability.ADJUST_CLOCK):
            structs["clock"] = vm.get_clock()
            values["clock_saved_at_ns"] = time.time_ns()
        states = tuple(_save_vcpu(v, msr_indices, irqchip or split) for v in vcpus)
        slots = _slot_states(vm, memory, base, track_dirty, epoch)
        wiring: dict[str, list[dict[str, Any]]] = {"irqfd": [], "ioeventfd": []}
        for kind, entry in vm._wiring.values():
            wiring[kind].append(dict(entry))
        if track_dirty or base is not None:
            vm._snapshot_epoch = values["tracking"] = uuid.uuid4().hex
    return VmState(ARCH, host_facts(ARCH), structs, values, states, slots, wiring,
                   base=None if base is None else base.id)
