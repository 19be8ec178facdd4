"""Restoring an x86 VM from a snapshot, in a new VM (restore_vm) or in place (load_state):
the order the state goes back in, and why (kvm_bindings.x86.snapshot has what is saved)."""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .._layout import expect, fill
from ..abi import x86_64 as abi
from ..backing import Backing
from ..errors import KvmError, PendingExitError, RestoreError, SnapshotError
from ..memory import PAGE_SIZE
from ..snapshot import MemorySlotState, VcpuState, VmState, file_identity, host_facts
from . import _msrs
from ._snapshot_common import (
    _CHIPS,
    _MSR_BATCH,
    _REPLAYED,
    ARCH,
    _all_stopped,
    _calls,
    _complete_pending,
    _from_json,
)

if TYPE_CHECKING:
    from .system import X86Kvm
    from .vcpu import X86Vcpu
    from .vm import X86Vm

__all__ = ["load_state", "restore_vm"]

# Writing the LAPIC restarts its timer from the saved registers and drops a TSC deadline
# armed before: this MSR goes back after the LAPIC.
_MSR_IA32_TSC_DEADLINE = 0x6E0


# ---- restoring ----------------------------------------------------------------------------

# What a state that passed its checksums but was built wrong (by hand, or by another
# program) trips over, beside the kernel's own refusals.
_MALFORMED = (KeyError, TypeError, ValueError, OverflowError, AttributeError, IndexError)


@contextmanager
def _refused_as(what: str, *kinds: type[BaseException]) -> Iterator[None]:
    """Turn those exceptions into a RestoreError naming what was being restored (a
    SnapshotError, itself a ValueError, stays as it is)."""
    try:
        yield
    except SnapshotError:
        raise
    except kinds as e:
        raise RestoreError(what, e) from e


def _step(what: str, call: Callable[..., Any], *args: Any) -> Any:
    with _refused_as(what, KvmError, *_MALFORMED):
        return call(*args)


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
    # The machine-check unit before the MSRs: how many banks there are (and whether
    # IA32_MCG_CTL exists) decides which of the saved bank MSRs KVM takes.
    mcg_cap = v.get("mcg_cap")
    if mcg_cap is not None:
        if type(mcg_cap) is not int:
            raise SnapshotError(f"{where}: mcg_cap {mcg_cap!r} is not an IA32_MCG_CAP value")
        _step(f"{where}: KVM_X86_SETUP_MCE", vcpu.setup_mce, mcg_cap)
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
    # The paravirtual TPR word and TPR reporting (set or cleared: a load_state() may find
    # them changed since the save). After the LAPIC, which they need.
    vapic = v.get("vapic", {"addr": 0, "tpr_access_reporting": False})
    if not isinstance(vapic, dict) or type(vapic.get("addr")) is not int \
            or type(vapic.get("tpr_access_reporting")) is not bool:
        raise SnapshotError(f"{where}: vapic {vapic!r} is not a vapic address and a bool")
    if vapic["addr"] != vcpu._vapic_addr:
        _step(f"{where}: KVM_SET_VAPIC_ADDR", vcpu.set_vapic_addr, vapic["addr"])
    if vapic["tpr_access_reporting"] != vcpu._tpr_reporting:
        _step(f"{where}: KVM_TPR_ACCESS_REPORTING", vcpu.set_tpr_access_reporting,
              vapic["tpr_access_reporting"])
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
    # A VmState is plain data a caller may have edited: its shape is checked like a file's.
    shapes = ((state.host, dict, "host"), (state.values, dict, "values"),
              (state.structs, dict, "structs"), (state.vcpus, (tuple, list), "vcpus"),
              (state.memory, (tuple, list), "memory"))
    for value, kind, name in shapes:
        if not isinstance(value, kind):
            raise SnapshotError(f"the state's {name} is a {type(value).__name__}")
    if not all(isinstance(v, VcpuState) for v in state.vcpus) or not all(
            isinstance(m, MemorySlotState) for m in state.memory):
        raise SnapshotError("the state's vcpus and memory must be VcpuState and "
                            "MemorySlotState objects")
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
        with _refused_as("the snapshot's state", *_MALFORMED):
            _restore_into(vm, state, memory, advance_clock)
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
            with _refused_as("the snapshot's state", *_MALFORMED):
                _load(vm, list(vcpus), state)
            # Memory last: a state the kernel refuses leaves it as it was.
            for m in state.memory:
                regions[m.slot].view()[:] = memoryview(m.data).cast("B")  # type: ignore[arg-type]
