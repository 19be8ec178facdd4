"""Saving and restoring an x86 VM: which ioctls hold its state, and the order they go back in.

X86Vm.save_state() and X86Kvm.restore_vm() are these functions; the format they write is
kvm_bindings.snapshot's. What is saved, per vCPU: regs, sregs2 (else sregs), the XSAVE
area sized by KVM_CAP_XSAVE2 (else xsave, else fpu), xcrs, debugregs, the LAPIC (with an
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
import errno
import mmap
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

from .._layout import expect, fill
from ..abi import x86_64 as abi
from ..backing import Backing
from ..errors import KvmError, PendingExitError, RestoreError, SnapshotError, StaleHandleError
from ..exits import InterruptedExit
from ..memory import PAGE_SIZE
from ..snapshot import MemorySlotState, VcpuState, VmState, file_identity, host_facts, iter_runs
from . import _msrs

if TYPE_CHECKING:
    from .system import X86Kvm
    from .vcpu import X86Vcpu
    from .vm import X86Vm

__all__ = ["load_state", "restore_vm", "save_state"]

ARCH = "x86_64"
_MSR_BATCH = 64
# Writing the LAPIC restarts its timer from the saved registers and drops a TSC deadline
# armed before: this MSR goes back after the LAPIC.
_MSR_IA32_TSC_DEADLINE = 0x6E0
# Exits whose instruction KVM finishes only on the next KVM_RUN (complete_userspace_io).
_COMPLETE_ON_RUN = frozenset({abi.KVM_EXIT_IO, abi.KVM_EXIT_MMIO, abi.KVM_EXIT_X86_RDMSR,
                              abi.KVM_EXIT_X86_WRMSR, abi.KVM_EXIT_HYPERCALL, abi.KVM_EXIT_XEN})
# The setup calls a restore makes again, by name: a snapshot names nothing else.
_REPLAYED = frozenset({"enable_cap", "enable_dirty_ring", "set_tss_addr", "set_identity_map_addr",
                       "set_boot_cpu_id", "create_irqchip", "create_pit2", "set_msr_filter",
                       "set_gsi_routing", "add_coalesced_mmio"})
_CHIPS = (("pic_master", abi.KVM_IRQCHIP_PIC_MASTER), ("pic_slave", abi.KVM_IRQCHIP_PIC_SLAVE),
          ("ioapic", abi.KVM_IRQCHIP_IOAPIC))


# ---- JSON for setup calls ---------------------------------------------------------------

def _to_json(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, (ctypes.Structure, ctypes.Union)):
        return {"struct": type(value).__name__, "bytes": bytes(value).hex()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and "bytes" in value:
        data = bytes.fromhex(value["bytes"])
        if "struct" not in value:
            return data
        ctype = getattr(abi, str(value["struct"]), None)
        if not isinstance(ctype, type) or not issubclass(ctype, (ctypes.Structure, ctypes.Union)):
            raise SnapshotError(f"a setup call names an unknown struct {value['struct']!r}")
        if len(data) != ctypes.sizeof(ctype):
            raise SnapshotError(f"{len(data)} bytes for a {ctype.__name__}")
        return ctype.from_buffer_copy(data)
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    return value


def _calls(setup: Mapping[object, tuple[str, dict[str, Any]]]) -> list[list[Any]]:
    return [[call, _to_json(kwargs)] for call, kwargs in setup.values()]


# ---- saving -------------------------------------------------------------------------------

def _complete_pending(vcpu: X86Vcpu) -> None:
    """A vCPU stopped at an I/O, MMIO or MSR exit has half an instruction done: KVM finishes
    it (with the answer in data) on the next KVM_RUN. Run once with immediate_exit so it
    does, and comes straight back without entering the guest."""
    if vcpu.kvm_run.exit_reason not in _COMPLETE_ON_RUN:
        return
    vcpu.immediate_exit = True
    try:
        e = vcpu.run()
    finally:
        vcpu.immediate_exit = False
    if not isinstance(e, InterruptedExit):
        raise PendingExitError(vcpu.id, e)


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
    n = 64
    while True:
        try:
            cpuid = vcpu.get_cpuid2(n)
        except KvmError as e:
            # E2BIG: more entries were set than fit; the kernel does not say how many.
            if e.errno != errno.E2BIG or n >= 1 << 12:
                raise
            n *= 4
            continue
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
    v["msrs"], v["msrs_refused"] = _read_msrs(vcpu, msr_indices)
    if has(abi.Capability.GET_TSC_KHZ):
        v["tsc_khz"] = vcpu.get_tsc_khz()
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


@contextmanager
def _all_stopped(vm: X86Vm) -> Iterator[tuple[X86Vcpu, ...]]:
    vcpus = vm.vcpus
    with ExitStack() as stack:
        for vcpu in vcpus:
            stack.enter_context(vcpu._stopped())
        yield vcpus


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
        if any(c == "create_pit2" for c, _ in setup):
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


# ---- restoring ----------------------------------------------------------------------------

def _step(what: str, call: Callable[..., Any], *args: Any) -> Any:
    try:
        return call(*args)
    except SnapshotError:
        raise
    except (KvmError, ValueError, TypeError, OverflowError, KeyError, AttributeError) as e:
        raise RestoreError(what, e) from e


def _replay(target: Any, calls: Any, where: str) -> None:
    for entry in calls:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise SnapshotError(f"{where}: {entry!r} is not a setup call")
        call, kwargs = entry
        if call not in _REPLAYED or not callable(getattr(target, call, None)):
            raise SnapshotError(f"{where}: {call!r} is not a setup call a restore makes")
        kwargs = _from_json(kwargs)
        if not isinstance(kwargs, dict):
            raise SnapshotError(f"{where}: {call}() takes its arguments by name")
        if call == "enable_cap":
            _step(f"{where}: KVM_ENABLE_CAP {kwargs['cap']}",
                  lambda k=kwargs: target.enable_cap(k["cap"], *k["args"], flags=k["flags"]))
        else:
            _step(f"{where}: {call}()", lambda c=call, k=kwargs: getattr(target, c)(**k))


def _restore_vcpu(vcpu: X86Vcpu, state: VcpuState) -> None:
    s, v = state.structs, state.values
    where = f"vcpu {vcpu.id}"
    has = vcpu.vm.check_extension
    # CPUID first: KVM checks CR4 bits, XCR0 and XSAVE components, and which MSRs exist,
    # against the guest's CPUID, and refuses a different CPUID once the vCPU has run.
    _step(f"{where}: KVM_SET_CPUID2", vcpu.set_cpuid2, s["cpuid"])
    # The TSC frequency before the MSRs: IA32_TSC is written in guest cycles at that rate.
    khz = v.get("tsc_khz")
    if khz is not None and type(khz) is not int:
        raise SnapshotError(f"{where}: tsc_khz {khz!r} is not a frequency")
    if khz and has(abi.Capability.TSC_CONTROL) and vcpu.get_tsc_khz() != khz:
        _step(f"{where}: KVM_SET_TSC_KHZ", vcpu.set_tsc_khz, khz)
    # Special registers before the MSRs and the LAPIC: EFER (which MSRs and modes are
    # legal) and the APIC base (xAPIC or x2APIC: how KVM reads the LAPIC's ID) are here.
    if "sregs2" in s:
        _step(f"{where}: KVM_SET_SREGS2", vcpu.set_sregs2, s["sregs2"])
    else:
        _step(f"{where}: KVM_SET_SREGS", vcpu.set_sregs, s["sregs"])
    msrs = {int(i): int(val) for i, val in v.get("msrs", ())}
    deadline = msrs.pop(_MSR_IA32_TSC_DEADLINE, None)
    _set_msrs(vcpu, msrs, where)
    # XCR0 before the XSAVE area: it says which components the area may hold.
    if "xcrs" in s:
        _step(f"{where}: KVM_SET_XCRS", vcpu.set_xcrs, s["xcrs"])
    if "xsave" in s:
        _step(f"{where}: KVM_SET_XSAVE", vcpu.set_xsave, s["xsave"])
    else:
        _step(f"{where}: KVM_SET_FPU", vcpu.set_fpu, s["fpu"])
    _step(f"{where}: KVM_SET_REGS", vcpu.set_regs, s["regs"])
    if "lapic" in s:
        _step(f"{where}: KVM_SET_LAPIC", vcpu.set_lapic, s["lapic"])
    # After the LAPIC, whose restore drops an armed deadline.
    if deadline is not None:
        _set_msrs(vcpu, {_MSR_IA32_TSC_DEADLINE: deadline}, where)
    # The MP state after the LAPIC (INIT and SIPI are LAPIC events), and the pending events
    # (exception, NMI, SMI, interrupt shadow) after both, which can change what is pending.
    if "mp_state" in v:
        _step(f"{where}: KVM_SET_MP_STATE", vcpu.set_mp_state, v["mp_state"])
    if "vcpu_events" in s:
        _step(f"{where}: KVM_SET_VCPU_EVENTS", vcpu.set_vcpu_events, s["vcpu_events"])
    if "debugregs" in s:
        _step(f"{where}: KVM_SET_DEBUGREGS", vcpu.set_debugregs, s["debugregs"])
    # Nested state last: KVM checks it against CPUID, the control registers, EFER and the
    # VMX/SVM MSRs, all restored above (the kernel's own state test does the same).
    if "nested_state" in s and has(abi.Capability.NESTED_STATE):
        _step(f"{where}: KVM_SET_NESTED_STATE", vcpu.set_nested_state, s["nested_state"])
    run = v.get("run", {})
    fill(vcpu.kvm_run, request_interrupt_window=run.get("request_interrupt_window", 0))
    valid = run.get("kvm_valid_regs", 0)
    if valid:
        _step(f"{where}: sync regs", vcpu.enable_sync_regs, valid)


def _set_msrs(vcpu: X86Vcpu, msrs: dict[int, int], where: str) -> None:
    """KVM_SET_MSRS in batches. KVM stops at the first MSR it refuses: one it lets the host
    read but not write back for this guest (a paravirtual MSR its CPUID does not offer)
    is stepped over if the new vCPU holds the saved value already; otherwise it is an error."""
    todo = list(msrs.items())
    while todo:
        batch = todo[:_MSR_BATCH]
        done = _step(f"{where}: KVM_SET_MSRS",
                     lambda b=batch: vcpu.ioctl(abi.KVM_SET_MSRS, _msrs.msrs(
                         [i for i, _ in b], [v for _, v in b])))
        if done < len(batch):
            index, value = batch[done]
            now = vcpu.get_msrs([index]).get(index)
            if now != value:
                raise RestoreError(f"{where}: KVM_SET_MSRS", KvmError(
                    "KVM_SET_MSRS", errno.EINVAL,
                    f"MSR {index:#x} = {value:#x} was refused (the new vCPU has "
                    f"{'no such MSR' if now is None else hex(now)})"))
            done += 1
        todo = todo[done:]


def _check(state: VmState, check_cpu: bool, call: str = "restore_vm") -> None:
    if not isinstance(state, VmState):
        raise TypeError(f"{call}() takes a VmState, not {type(state).__name__}")
    if state.arch != ARCH:
        raise SnapshotError(f"this snapshot is of an {state.arch} VM, not {ARCH}")
    if state.incremental:
        raise SnapshotError("this snapshot is incremental: VmState.from_bytes(data, base=...) "
                            "puts it together with its base first")
    here = host_facts(ARCH)
    if check_cpu and state.host.get("cpu_vendor") != here.get("cpu_vendor"):
        raise SnapshotError(f"this snapshot was taken on a {state.host.get('cpu_vendor')} CPU "
                            f"and this host is {here.get('cpu_vendor')}: its CPUID and MSRs "
                            f"would not fit (check_cpu=False restores it anyway)")
    for slot in state.memory:
        if slot.data is None and slot.pages is not None:
            raise SnapshotError(f"slot {slot.slot} holds only pages: apply the base first")


def restore_vm(kvm: X86Kvm, state: VmState, *, memory: Mapping[int, Backing] | None = None,
               check_cpu: bool = True, advance_clock: bool = False) -> X86Vm:
    """See X86Kvm.restore_vm."""
    _check(state, check_cpu)
    memory = dict(memory or {})
    for slot in memory:
        held = [m for m in state.memory if m.slot == slot]
        if not held:
            raise ValueError(f"memory= names slot {slot!r}, which the snapshot does not have "
                             f"(its slots: {[m.slot for m in state.memory]})")
        if held[0].data is not None:
            raise ValueError(f"memory= gives slot {slot}'s memory, but the snapshot holds it "
                             f"too: save with memory=False, or leave slot {slot} out")
    for m in state.memory:
        if m.data is None and m.slot not in memory:
            raise SnapshotError(f"the snapshot does not hold slot {m.slot}'s memory "
                                f"({m.guest_phys_addr:#x}, {m.size:#x} bytes): pass it in "
                                f"memory={{{m.slot}: backing}}")
    vm: X86Vm = _step("KVM_CREATE_VM", lambda: kvm.create_vm(state.values.get("type", 0)))
    try:
        _restore_into(vm, state, memory, advance_clock)
    except SnapshotError:
        vm.close()
        raise
    except (KeyError, TypeError, ValueError, OverflowError, AttributeError, IndexError) as e:
        # What a snapshot that passed its checksums but was built wrong (by hand, or by
        # another program) trips over: the same promise, a closed VM and one error type.
        vm.close()
        raise RestoreError("the snapshot's state", e) from e
    except BaseException:
        vm.close()
        raise
    return vm


def _restore_into(vm: X86Vm, state: VmState, memory: Mapping[int, Backing],
                  advance_clock: bool = False) -> None:
    values = state.values
    # Setup calls first, in the order they were made: several (the irqchip, a split
    # irqchip, the dirty ring) must come before any vCPU exists.
    _replay(vm, values.get("setup", ()), "vm")
    for m in state.memory:
        backing, owned = memory.get(m.slot), False
        if backing is None:
            owned = True
            if m.source is not None and m.source[1] % PAGE_SIZE == 0:
                # Memory in a file of its own: mapped copy-on-write, nothing copied.
                backing = _step(f"slot {m.slot}: mapping {m.source[0]}",
                                lambda src=m.source, m=m: Backing.file(src[0], m.size, src[1],
                                                                       shared=False))
                if file_identity(backing.fileno()) != m.source_id:
                    backing.close()
                    raise SnapshotError(f"the memory file {m.source[0]} changed (or was "
                                        f"replaced) since VmState.read() checked it")
            else:
                # Allocated in one go and filled before KVM has the slot: page by page
                # first-touch faults cost more than the copy itself.
                backing = Backing.anonymous(m.size, populate=m.data is not None)
                if m.data is not None:
                    backing.view()[:] = m.data
        try:
            region = _step(f"slot {m.slot}: KVM_SET_USER_MEMORY_REGION",
                           lambda b=backing, m=m: vm.add_memory(
                               m.guest_phys_addr, m.size, backing=b, slot=m.slot,
                               readonly=bool(m.flags & abi.KVM_MEM_READONLY),
                               log_dirty=bool(m.flags & abi.KVM_MEM_LOG_DIRTY_PAGES)))
        except BaseException:
            if owned:
                backing.close()
            raise
        if owned:
            region._owns_backing = True     # the restored VM unmaps it with the slot
    vcpus = []
    for vs in state.vcpus:
        vcpu = _step(f"vcpu {vs.id}: KVM_CREATE_VCPU", vm.create_vcpu, vs.id)
        _replay(vcpu, vs.values.get("setup", ()), f"vcpu {vs.id}")
        vcpus.append(vcpu)
    _load(vm, vcpus, state, advance_clock)


def _load(vm: X86Vm, vcpus: list[X86Vcpu], state: VmState, advance_clock: bool = False) -> None:
    """Every vCPU's state, then the VM-wide state, into vCPUs made for it."""
    structs = state.structs
    for vcpu, vs in zip(vcpus, state.vcpus):
        _restore_vcpu(vcpu, vs)
    # The interrupt controllers after the vCPUs and their LAPICs: an interrupt they hold
    # pending is delivered as soon as they are set, to LAPICs that must be ready for it.
    for name, _ in _CHIPS:
        if name in structs:
            _step(f"{name}: KVM_SET_IRQCHIP", vm.set_irqchip, structs[name])
    # The PIT after them: it starts counting again as it is set, into IRQ0.
    if "pit2" in structs:
        _step("KVM_SET_PIT2", vm.set_pit2, structs["pit2"])
    # kvmclock last. By default without KVM_CLOCK_REALTIME: the guest's clock goes on from
    # where it stopped. advance_clock: on by the wall-clock time since the save (a
    # migration), through the kernel's KVM_CLOCK_REALTIME where the snapshot has it (the
    # saving host's clock was TSC-based), else by the time the save recorded.
    if "clock" in structs:
        clock = abi.kvm_clock_data.from_buffer_copy(
            expect(structs["clock"], abi.kvm_clock_data, "the snapshot's clock"))
        realtime = clock.flags & abi.KVM_CLOCK_REALTIME
        clock.flags = 0
        if advance_clock:
            supported = vm.check_extension(abi.Capability.ADJUST_CLOCK)
            if realtime and supported & abi.KVM_CLOCK_REALTIME:
                clock.flags = abi.KVM_CLOCK_REALTIME
            else:
                saved_at = state.values.get("clock_saved_at_ns")
                if type(saved_at) is not int:
                    raise SnapshotError("advance_clock: the snapshot does not say when it was "
                                        "taken")
                clock.clock += max(0, time.time_ns() - saved_at)
        _step("KVM_SET_CLOCK", vm.set_clock, clock)


# ---- loading into the VM the snapshot came from --------------------------------------------

def _stop_pending(vcpu: X86Vcpu) -> None:
    """Finish whatever exit the vCPU stopped at (its result is about to be overwritten),
    so that no half-done instruction completes on top of the loaded state."""
    for _ in range(16):
        try:
            _complete_pending(vcpu)
            return
        except PendingExitError:
            continue            # a string I/O going on: finish that too
    raise SnapshotError(f"vCPU {vcpu.id} keeps exiting while its pending I/O is finished")


def load_state(vm: X86Vm, state: VmState, *, check_cpu: bool = True) -> None:
    """See X86Vm.load_state."""
    vm.fd  # noqa: B018 - a closed VM refuses before anything else
    _check(state, check_cpu, "load_state")
    # Everything that can be checked is checked before anything changes.
    setup = [list(c) for c in _calls(vm._setup)]
    if setup != [list(c) for c in state.values.get("setup", ())]:
        raise SnapshotError("this VM was not set up as the snapshot's was (its setup calls "
                            "differ): load_state() is for the VM a snapshot came from, or one "
                            "restore_vm() made from it")
    regions = {r.slot: r for r in vm.memory.regions}
    # Read-only decides what a guest write does; dirty logging is the VMM's own business.
    seen = ~abi.KVM_MEM_LOG_DIRTY_PAGES
    if sorted((r.slot, r.guest_phys_addr, r.size, r.flags & seen)
              for r in regions.values()) != sorted(
            (m.slot, m.guest_phys_addr, m.size, m.flags & seen) for m in state.memory):
        raise SnapshotError("this VM's memory slots (addresses, sizes, flags) are not the "
                            "snapshot's")
    for m in state.memory:
        if m.data is None:
            raise SnapshotError(f"the snapshot does not hold slot {m.slot}'s memory")
    vcpus = vm.vcpus
    if [v.id for v in vcpus] != [vs.id for vs in state.vcpus]:
        raise SnapshotError(f"this VM's vCPUs {[v.id for v in vcpus]} are not the snapshot's "
                            f"{[vs.id for vs in state.vcpus]}")
    with vm._snapshot_lock:
        with _all_stopped(vm):
            pass        # a busy vCPU refuses before a pending exit is finished anywhere
        for vcpu in vcpus:
            _stop_pending(vcpu)
        with _all_stopped(vm):
            # Every page may differ from what a tracked snapshot last saw.
            vm._snapshot_epoch = None
            try:
                _load(vm, list(vcpus), state)
            except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as e:
                if isinstance(e, SnapshotError):
                    raise
                raise RestoreError("the snapshot's state", e) from e
            # Memory last: a state the kernel refuses leaves it as it was.
            for m in state.memory:
                regions[m.slot].view()[:] = memoryview(m.data).cast("B")  # type: ignore[arg-type]
