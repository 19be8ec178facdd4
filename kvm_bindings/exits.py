"""Decoded KVM_RUN exits: one small class per exit reason, carrying its kvm_run member's fields.

Each ExitReason member has its class written out below, named after it (HltExit for HLT,
X86RdmsrExit for X86_RDMSR; UnknownHardwareExit for KVM_EXIT_UNKNOWN, InterruptedExit for
INTR); EXIT_CLASSES maps reasons to them. An exit whose reason fills a kvm_run member
(abi.EXIT_MEMBERS, read from the comments in struct kvm_run) carries a copy of it as
.payload, typed as its generated class, and each of its fields as a typed attribute.
tests/test_exit_classes.py fails, naming the class or field to write, when the headers
gain a reason or a member gains a field. IO and MMIO exits are decoded with precomputed
unpackers.

Lifetime, one rule: an exit is a snapshot of kvm_run taken when run() returned,
and it never changes afterwards. What it carries (port, data of a write, the
payload's fields) stays readable for as long as you keep the object. Its answer
(the data of an IN or MMIO read, which you fill in; reply()) is handed to the
kernel by that vCPU's next run(), so answering is only possible until then:
after the next run() (or close()) every use of the answer buffer, and reply(),
raise StaleExitError, and no exit can reach another exit's bytes. run() refills an
exit object only once nothing but the vCPU holds it: one you keep never changes.
"""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, overload

from . import abi
from ._layout import check_bool, fill
from .errors import StaleExitError

if TYPE_CHECKING:
    from .vcpu import Vcpu

ExitReason = abi.ExitReason

__all__ = [
    "EXIT_CLASSES", "Exit", "SimpleExit", "PayloadExit", "MsrExit", "UnknownExit",
    # one per ExitReason member, in its order
    "UnknownHardwareExit", "ExceptionExit", "IoExit", "HypercallExit", "DebugExit", "HltExit",
    "MmioExit", "IrqWindowOpenExit", "ShutdownExit", "FailEntryExit", "InterruptedExit",
    "SetTprExit", "TprAccessExit", "S390SieicExit", "S390ResetExit", "DcrExit", "NmiExit",
    "InternalErrorExit", "OsiExit", "PaprHcallExit", "S390UcontrolExit", "WatchdogExit",
    "S390TschExit", "EprExit", "SystemEventExit", "S390StsiExit", "IoapicEoiExit", "HypervExit",
    "ArmNisvExit", "X86RdmsrExit", "X86WrmsrExit", "DirtyRingFullExit", "ApResetHoldExit",
    "X86BusLockExit", "XenExit", "RiscvSbiExit", "RiscvCsrExit", "NotifyExit",
    "LoongarchIocsrExit", "MemoryFaultExit", "TdxExit", "ArmSeaExit", "ArmLdst64bExit",
    "SnpReqCertsExit",
]

_T = TypeVar("_T")
_P = TypeVar("_P")

# Filled by the class statements below: `class HltExit(SimpleExit, reason=ExitReason.HLT)`.
EXIT_CLASSES: dict[ExitReason, type[Exit]] = {}


class Exit:
    """Base of every exit: .reason is the ExitReason (the raw int for an UnknownExit)."""

    __slots__ = ("reason",)
    reason: ExitReason | int
    _field_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, reason: ExitReason | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if reason is not None:
            if reason in EXIT_CLASSES:
                raise TypeError(f"{reason!r} has two classes: {EXIT_CLASSES[reason].__name__} "
                                f"and {cls.__name__}")
            EXIT_CLASSES[reason] = cls
        cls._field_names = tuple(name for klass in reversed(cls.__mro__)
                                 for name, value in vars(klass).items() if isinstance(value, _Field))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={text}" for name, text in self._shown())
        name = getattr(self.reason, "name", self.reason)
        return f"<{type(self).__name__} {name}{': ' + shown if shown else ''}>"

    def _shown(self) -> list[tuple[str, str]]:
        return []

    def __reduce_ex__(self, protocol: object) -> Any:
        # Not the vCPU's refusal (it would name the vCPU): an exit's answer is tied to that
        # vCPU's next run, which no copy can reach.
        raise TypeError(f"a {type(self).__name__} belongs to one run of its vCPU and cannot be "
                        f"copied or pickled: keep the fields you need (e.port, e.data...)")


class _Field(Generic[_T]):
    """A field of an exit's kvm_run member, read from the exit's copy of it, typed _T.
    c_name: its name in the member when the attribute needs another; count: the field
    holding how many elements of this array are valid; convert: from ctypes to _T."""

    __slots__ = ("c_name", "convert", "count")

    def __init__(self, c_name: str = "", convert: Callable[[Any], _T] | None = None,
                 count: str = "") -> None:
        self.c_name = c_name
        self.convert = convert
        self.count = count

    def __set_name__(self, owner: type[Any], name: str) -> None:
        if not self.c_name:
            self.c_name = name

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> _Field[_T]: ...
    @overload
    def __get__(self, obj: PayloadExit[Any], owner: type[Any]) -> _T: ...

    def __get__(self, obj: PayloadExit[Any] | None, owner: type[Any]) -> _Field[_T] | _T:
        if obj is None:
            return self
        payload = obj._payload
        value = getattr(payload, self.c_name)
        if self.count:
            value = value[:getattr(payload, self.count)]
        if self.convert is not None:
            value = self.convert(value)
        result: _T = value
        return result


def _enum(cls_name: str) -> Callable[[int], Any]:
    """A converter to the abi enum cls_name (looked up on first use: enums are built lazily),
    leaving a value it lacks a plain int."""
    def convert(value: int) -> Any:
        try:
            return getattr(abi, cls_name)(value)
        except ValueError:
            return value
    return convert


# Shown in hex by repr(): addresses, ports, MSR indexes and values, flags, register dumps.
_HEX = frozenset({"port", "phys_addr", "gpa", "gva", "fault_ipa", "addr", "rip", "pc", "far",
                  "index", "data", "args", "gprs", "flags", "esr", "esr_iss", "dr6", "dr7",
                  "hardware_entry_failure_reason", "trans_exc_code", "csr_num", "new_value",
                  "write_mask", "ret_value", "io_int_parm", "io_int_word"})


def _show(name: str, value: object) -> str:
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}" if value.name else repr(value)
    if isinstance(value, bool) or not isinstance(value, (int, list, ctypes.Array, ctypes.Structure,
                                                         ctypes.Union)):
        return repr(value)          # bytes, True/False
    if isinstance(value, int):
        return hex(value) if name in _HEX else str(value)
    if isinstance(value, (list, ctypes.Array)):
        return "[" + ", ".join(_show(name, v) for v in value) + "]"
    if isinstance(value, ctypes.Union):
        return "{...}"              # which member is meant depends on a type field
    return "{" + ", ".join(f"{n}={_show(n, getattr(value, n))}" for n in _c_fields(type(value))
                           if not n.startswith(("pad", "reserved"))) + "}"


def _c_fields(t: Any) -> list[str]:
    """The fields of a generated struct, as attributes: anonymous members' fields in their place."""
    anonymous = getattr(t, "_anonymous_", ())
    return [n for name, ftype, *_ in t._fields_
            for n in (_c_fields(ftype) if name in anonymous else [name])]


# ---- exits with a data buffer: IO and MMIO ------------------------------------------------

class _StaleAnswer:
    """What an answered exit's data becomes once its vCPU ran again (or closed): every use
    raises StaleExitError, where a buffer would silently take bytes nobody reads."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]

    def _refuse(self, *args: object) -> Any:
        raise StaleExitError("this exit's answer buffer is stale: its vCPU ran again (or "
                             "closed) since, and the answer was delivered (or dropped) then")

    __getitem__ = __setitem__ = __len__ = __iter__ = __bytes__ = __eq__ = __contains__ = _refuse
    __copy__ = __deepcopy__ = __reduce_ex__ = __reduce__ = _refuse
    __buffer__ = _refuse        # memoryview(data), Python 3.12 on; before that a TypeError

    def __getattr__(self, name: str) -> Any:      # tobytes(), cast(), hex()...
        return self._refuse()

    def __repr__(self) -> str:
        return "<stale>"


_STALE_ANSWER: Any = _StaleAnswer()


class _DataExit(Exit):
    """An exit with a data buffer: a copy for guest writes, an answer buffer for guest reads.

    data is a plain attribute (read on every exit, so it costs no call): for a guest write
    the bytes written, a copy valid for good; for a guest read a writable memoryview whose
    bytes the guest receives on the next run(). After that run (or close()) the view is
    released and data is replaced by a stand-in whose every use raises StaleExitError."""

    __slots__ = ("is_write", "data")
    reason: ExitReason
    is_write: bool
    data: bytes | memoryview

    def _shown_data(self) -> str:
        return repr(self.data) if self.data is _STALE_ANSWER else repr(bytes(self.data))


class IoExit(_DataExit, reason=ExitReason.IO):
    """KVM_EXIT_IO, kvm_run.io: port I/O, with size*count bytes of data.

    data holds every element of a rep string op: for OUT the bytes written, for IN a
    writable buffer the guest's input comes from."""

    __slots__ = ("port", "size", "count")
    port: int
    size: int
    count: int

    def _shown(self) -> list[tuple[str, str]]:
        return [("port", hex(self.port)), ("size", str(self.size)), ("count", str(self.count)),
                ("is_write", str(self.is_write)), ("data", self._shown_data())]


class MmioExit(_DataExit, reason=ExitReason.MMIO):
    """KVM_EXIT_MMIO, kvm_run.mmio: an access to memory no slot backs, or a write to a read-only one.

    data is exactly len bytes; for a read, the buffer whose bytes the guest receives."""

    __slots__ = ("phys_addr",)
    phys_addr: int

    def _shown(self) -> list[tuple[str, str]]:
        return [("phys_addr", hex(self.phys_addr)), ("is_write", str(self.is_write)),
                ("data", self._shown_data())]


# ---- exits carrying nothing but their reason ----------------------------------------------

class SimpleExit(Exit):
    """An exit that carries nothing but its reason (HLT, SHUTDOWN, IRQ_WINDOW_OPEN, ...)."""
    __slots__ = ()
    reason: ExitReason


class UnknownExit(Exit):
    """An exit reason these bindings have no class for (a newer kernel's): .reason is the int."""
    __slots__ = ()


class HltExit(SimpleExit, reason=ExitReason.HLT):
    """KVM_EXIT_HLT, no kvm_run member: the guest executed HLT."""
    __slots__ = ()


class IrqWindowOpenExit(SimpleExit, reason=ExitReason.IRQ_WINDOW_OPEN):
    """KVM_EXIT_IRQ_WINDOW_OPEN, no kvm_run member: the guest can take an interrupt now."""
    __slots__ = ()


class ShutdownExit(SimpleExit, reason=ExitReason.SHUTDOWN):
    """KVM_EXIT_SHUTDOWN, no kvm_run member: the guest shut down (on x86, a triple fault)."""
    __slots__ = ()


class InterruptedExit(SimpleExit, reason=ExitReason.INTR):
    """KVM_EXIT_INTR, no kvm_run member: KVM_RUN returned EINTR; run again to continue.

    The cause was a signal, kick() or immediate_exit."""
    __slots__ = ()


class SetTprExit(SimpleExit, reason=ExitReason.SET_TPR):
    """KVM_EXIT_SET_TPR, no kvm_run member: the guest wrote the TPR (unused by current KVM)."""
    __slots__ = ()


class NmiExit(SimpleExit, reason=ExitReason.NMI):
    """KVM_EXIT_NMI, no kvm_run member: an NMI exit (unused by current KVM)."""
    __slots__ = ()


class WatchdogExit(SimpleExit, reason=ExitReason.WATCHDOG):
    """KVM_EXIT_WATCHDOG, no kvm_run member: the (PowerPC BookE) watchdog expired."""
    __slots__ = ()


class DirtyRingFullExit(SimpleExit, reason=ExitReason.DIRTY_RING_FULL):
    """KVM_EXIT_DIRTY_RING_FULL, no kvm_run member: harvest the dirty ring, then run again."""
    __slots__ = ()


class ApResetHoldExit(SimpleExit, reason=ExitReason.AP_RESET_HOLD):
    """KVM_EXIT_AP_RESET_HOLD, no kvm_run member: an SEV-ES AP is parked awaiting a reset."""
    __slots__ = ()


class X86BusLockExit(SimpleExit, reason=ExitReason.X86_BUS_LOCK):
    """KVM_EXIT_X86_BUS_LOCK, no kvm_run member: the guest took a bus lock (KVM_CAP_X86_BUS_LOCK_EXIT)."""
    __slots__ = ()


# ---- exits carrying a copy of their kvm_run member ---------------------------------------

class PayloadExit(Exit, Generic[_P]):
    """An exit whose kvm_run member is copied out: .payload, typed as the member's generated
    class, and each of the member's fields as a typed attribute (exit.pc, exit.suberror...)."""

    __slots__ = ("_payload", "_vcpu")
    reason: ExitReason
    _payload: _P
    _vcpu: Vcpu

    @property
    def payload(self) -> _P:
        """This exit's copy of its kvm_run member (the generated ctypes class, e.g. abi.kvm_run_hw)."""
        return self._payload

    def _write_back(self, **fields: int) -> None:
        """Set fields of this exit's kvm_run member in the live kvm_run: the answer
        the kernel reads on the next KVM_RUN. Only until then: after it, StaleExitError."""
        vcpu = self._vcpu
        payload: Any = self._payload        # only members with fields have a reply()
        checked = fill(type(payload)(), **fields)   # range-checked before any write
        # Holding the run gate, no run() can start between the staleness check and the write.
        with vcpu._between_runs(f"reply() to a {type(self).__name__}"):
            if vcpu._pending is not self:
                raise StaleExitError(f"reply() to a stale {type(self).__name__}: vCPU {vcpu.id} "
                                     f"ran again (or closed) since; the guest has moved on")
            live = vcpu._run_member(self.reason)
            for k in fields:
                value = getattr(checked, k)
                setattr(payload, k, value)
                setattr(live, k, value)

    def _shown(self) -> list[tuple[str, str]]:
        return [(name, _show(name, getattr(self, name))) for name in self._field_names
                if not name.startswith(("pad", "reserved"))]


class UnknownHardwareExit(PayloadExit[abi.kvm_run_hw], reason=ExitReason.UNKNOWN):
    """KVM_EXIT_UNKNOWN, kvm_run.hw: a hardware exit KVM itself did not handle."""
    __slots__ = ()
    hardware_exit_reason: _Field[int] = _Field()


class ExceptionExit(PayloadExit[abi.kvm_run_ex], reason=ExitReason.EXCEPTION):
    """KVM_EXIT_EXCEPTION, kvm_run.ex: a guest exception handed to userspace."""
    __slots__ = ()
    exception: _Field[int] = _Field()
    error_code: _Field[int] = _Field()


class HypercallExit(PayloadExit[abi.kvm_run_hypercall], reason=ExitReason.HYPERCALL):
    """KVM_EXIT_HYPERCALL, kvm_run.hypercall: nr and args; reply(ret) sets the return value."""
    __slots__ = ()
    nr: _Field[int] = _Field()
    args: _Field[list[int]] = _Field(convert=list)
    ret: _Field[int] = _Field()
    longmode: _Field[int] = _Field()
    flags: _Field[int] = _Field()

    def reply(self, ret: int) -> None:
        """The value the guest's hypercall returns (before the next run())."""
        self._write_back(ret=ret)


class DebugExit(PayloadExit[abi.kvm_run_debug], reason=ExitReason.DEBUG):
    """KVM_EXIT_DEBUG, kvm_run.debug: a single-step, breakpoint or watchpoint (arch fields)."""
    __slots__ = ()
    arch: _Field[abi.kvm_debug_exit_arch] = _Field()


class FailEntryExit(PayloadExit[abi.kvm_run_fail_entry], reason=ExitReason.FAIL_ENTRY):
    """KVM_EXIT_FAIL_ENTRY, kvm_run.fail_entry: VM entry failed; the hardware's reason why."""
    __slots__ = ()
    hardware_entry_failure_reason: _Field[int] = _Field()
    cpu: _Field[int] = _Field()


class TprAccessExit(PayloadExit[abi.kvm_run_tpr_access], reason=ExitReason.TPR_ACCESS):
    """KVM_EXIT_TPR_ACCESS, kvm_run.tpr_access: the guest touched the TPR (KVM_TPR_ACCESS_REPORTING)."""
    __slots__ = ()
    rip: _Field[int] = _Field()
    is_write: _Field[int] = _Field()
    pad: _Field[int] = _Field()


class S390SieicExit(PayloadExit[abi.kvm_run_s390_sieic], reason=ExitReason.S390_SIEIC):
    """KVM_EXIT_S390_SIEIC, kvm_run.s390_sieic: an s390 SIE intercept."""
    __slots__ = ()
    icptcode: _Field[int] = _Field()
    ipa: _Field[int] = _Field()
    ipb: _Field[int] = _Field()


class S390ResetExit(PayloadExit[ctypes.c_uint64], reason=ExitReason.S390_RESET):
    """KVM_EXIT_S390_RESET, kvm_run.s390_reset_flags (a scalar member): value is the flags."""
    __slots__ = ()
    value: _Field[int] = _Field()


class S390UcontrolExit(PayloadExit[abi.kvm_run_s390_ucontrol], reason=ExitReason.S390_UCONTROL):
    """KVM_EXIT_S390_UCONTROL, kvm_run.s390_ucontrol: a user-controlled VM's translation fault."""
    __slots__ = ()
    trans_exc_code: _Field[int] = _Field()
    pgm_code: _Field[int] = _Field()


class DcrExit(PayloadExit[abi.kvm_run_dcr], reason=ExitReason.DCR):
    """KVM_EXIT_DCR, kvm_run.dcr: a PowerPC device control register access (deprecated)."""
    __slots__ = ()
    dcrn: _Field[int] = _Field()
    data: _Field[int] = _Field()
    is_write: _Field[int] = _Field()


class InternalErrorExit(PayloadExit[abi.kvm_run_internal], reason=ExitReason.INTERNAL_ERROR):
    """KVM_EXIT_INTERNAL_ERROR, kvm_run.internal: suberror (abi.InternalError) and ndata words.

    For an emulation failure, instruction is what KVM could not emulate."""
    __slots__ = ()
    suberror: _Field[abi.InternalError | int] = _Field(convert=_enum("InternalError"))
    ndata: _Field[int] = _Field()
    data: _Field[list[int]] = _Field(convert=list, count="ndata")

    @property
    def instruction(self) -> bytes | None:
        """The bytes at the guest's RIP that KVM failed to emulate: kvm_run.emulation_failure
        insn_bytes[:insn_size], where the suberror is KVM_INTERNAL_ERROR_EMULATION and KVM
        set KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES; else None. KVM hands over
        as many bytes as it fetched (up to 15), which may run past the one instruction."""
        payload = self._payload
        if payload.suberror != abi.KVM_INTERNAL_ERROR_EMULATION:
            return None
        # The same kvm_run union member seen as the emulation_failure struct KVM filled.
        view = abi.kvm_run_emulation_failure.from_buffer_copy(
            bytes(payload)[:ctypes.sizeof(abi.kvm_run_emulation_failure)])
        if not view.flags & abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
            return None
        size = min(view.insn_size, len(view.insn_bytes))
        return bytes(view.insn_bytes[:size])


class OsiExit(PayloadExit[abi.kvm_run_osi], reason=ExitReason.OSI):
    """KVM_EXIT_OSI, kvm_run.osi: a PowerPC OSI call, with the guest's GPRs."""
    __slots__ = ()
    gprs: _Field[list[int]] = _Field(convert=list)


class PaprHcallExit(PayloadExit[abi.kvm_run_papr_hcall], reason=ExitReason.PAPR_HCALL):
    """KVM_EXIT_PAPR_HCALL, kvm_run.papr_hcall: a PowerPC PAPR hypercall."""
    __slots__ = ()
    nr: _Field[int] = _Field()
    ret: _Field[int] = _Field()
    args: _Field[list[int]] = _Field(convert=list)


class S390TschExit(PayloadExit[abi.kvm_run_s390_tsch], reason=ExitReason.S390_TSCH):
    """KVM_EXIT_S390_TSCH, kvm_run.s390_tsch: an s390 TEST SUBCHANNEL intercept."""
    __slots__ = ()
    subchannel_id: _Field[int] = _Field()
    subchannel_nr: _Field[int] = _Field()
    io_int_parm: _Field[int] = _Field()
    io_int_word: _Field[int] = _Field()
    ipb: _Field[int] = _Field()
    dequeued: _Field[int] = _Field()


class EprExit(PayloadExit[abi.kvm_run_epr], reason=ExitReason.EPR):
    """KVM_EXIT_EPR, kvm_run.epr: a PowerPC external proxy interrupt acknowledge."""
    __slots__ = ()
    epr: _Field[int] = _Field()


class SystemEventExit(PayloadExit[abi.kvm_run_system_event], reason=ExitReason.SYSTEM_EVENT):
    """KVM_EXIT_SYSTEM_EVENT, kvm_run.system_event: shutdown, reset, crash... and ndata words.

    type is an abi.SystemEvent; flags is data[0] under its older name."""
    __slots__ = ()
    type: _Field[abi.SystemEvent | int] = _Field(convert=_enum("SystemEvent"))
    ndata: _Field[int] = _Field()
    flags: _Field[int] = _Field()
    data: _Field[list[int]] = _Field(convert=list, count="ndata")


class S390StsiExit(PayloadExit[abi.kvm_run_s390_stsi], reason=ExitReason.S390_STSI):
    """KVM_EXIT_S390_STSI, kvm_run.s390_stsi: an s390 STORE SYSTEM INFORMATION intercept."""
    __slots__ = ()
    addr: _Field[int] = _Field()
    ar: _Field[int] = _Field()
    reserved: _Field[int] = _Field()
    fc: _Field[int] = _Field()
    sel1: _Field[int] = _Field()
    sel2: _Field[int] = _Field()


class IoapicEoiExit(PayloadExit[abi.kvm_run_eoi], reason=ExitReason.IOAPIC_EOI):
    """KVM_EXIT_IOAPIC_EOI, kvm_run.eoi: the guest ended a level interrupt of a split irqchip."""
    __slots__ = ()
    vector: _Field[int] = _Field()


class HypervExit(PayloadExit[abi.kvm_hyperv_exit], reason=ExitReason.HYPERV):
    """KVM_EXIT_HYPERV, kvm_run.hyperv: a Hyper-V SynIC, hypercall or synthetic debugger exit."""
    __slots__ = ()
    type: _Field[int] = _Field()
    pad1: _Field[int] = _Field()
    u: _Field[abi.kvm_hyperv_exit_u] = _Field()


class _NisvExit(PayloadExit[abi.kvm_run_arm_nisv]):
    """The fields of kvm_run.arm_nisv, which two exit reasons share."""
    __slots__ = ()
    esr_iss: _Field[int] = _Field()
    fault_ipa: _Field[int] = _Field()


class ArmNisvExit(_NisvExit, reason=ExitReason.ARM_NISV):
    """KVM_EXIT_ARM_NISV, kvm_run.arm_nisv: a data abort with no valid syndrome (KVM_CAP_ARM_NISV_TO_USER)."""
    __slots__ = ()


class MsrExit(PayloadExit[abi.kvm_run_msr]):
    """KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR, kvm_run.msr: an MSR access (KVM_CAP_X86_USER_SPACE_MSR).

    index, data, and msr_reason (kvm_run.msr.reason: why it came to userspace, an
    abi.MsrExitReason); answer with reply() before the next run."""
    __slots__ = ()
    error: _Field[int] = _Field()
    pad: _Field[bytes] = _Field(convert=bytes)
    msr_reason: _Field[abi.MsrExitReason] = _Field("reason", convert=_enum("MsrExitReason"))
    index: _Field[int] = _Field()
    data: _Field[int] = _Field()

    def reply(self, data: int | None = None, error: bool = False) -> None:
        """For RDMSR, the value the guest reads; error=True injects #GP instead."""
        check_bool(error, "error")
        if data is not None:
            self._write_back(data=data, error=int(error))
        else:
            self._write_back(error=int(error))


class X86RdmsrExit(MsrExit, reason=ExitReason.X86_RDMSR):
    """KVM_EXIT_X86_RDMSR, kvm_run.msr: the guest read MSR index; reply(value) answers."""
    __slots__ = ()


class X86WrmsrExit(MsrExit, reason=ExitReason.X86_WRMSR):
    """KVM_EXIT_X86_WRMSR, kvm_run.msr: the guest wrote data to MSR index; reply() accepts it."""
    __slots__ = ()


class XenExit(PayloadExit[abi.kvm_xen_exit], reason=ExitReason.XEN):
    """KVM_EXIT_XEN, kvm_run.xen: a Xen hypercall (KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL)."""
    __slots__ = ()
    type: _Field[int] = _Field()
    u: _Field[abi.kvm_xen_exit_u] = _Field()


class RiscvSbiExit(PayloadExit[abi.kvm_run_riscv_sbi], reason=ExitReason.RISCV_SBI):
    """KVM_EXIT_RISCV_SBI, kvm_run.riscv_sbi: an SBI call KVM forwards to userspace."""
    __slots__ = ()
    extension_id: _Field[int] = _Field()
    function_id: _Field[int] = _Field()
    args: _Field[list[int]] = _Field(convert=list)
    ret: _Field[list[int]] = _Field(convert=list)


class RiscvCsrExit(PayloadExit[abi.kvm_run_riscv_csr], reason=ExitReason.RISCV_CSR):
    """KVM_EXIT_RISCV_CSR, kvm_run.riscv_csr: a CSR access KVM forwards to userspace."""
    __slots__ = ()
    csr_num: _Field[int] = _Field()
    new_value: _Field[int] = _Field()
    write_mask: _Field[int] = _Field()
    ret_value: _Field[int] = _Field()


class NotifyExit(PayloadExit[abi.kvm_run_notify], reason=ExitReason.NOTIFY):
    """KVM_EXIT_NOTIFY, kvm_run.notify: the guest sat in a non-interruptible window too long."""
    __slots__ = ()
    flags: _Field[int] = _Field()


class LoongarchIocsrExit(PayloadExit[abi.kvm_run_iocsr_io], reason=ExitReason.LOONGARCH_IOCSR):
    """KVM_EXIT_LOONGARCH_IOCSR, kvm_run.iocsr_io: a LoongArch IOCSR access (data: all 8 bytes)."""
    __slots__ = ()
    phys_addr: _Field[int] = _Field()
    data: _Field[bytes] = _Field(convert=bytes)
    len: _Field[int] = _Field()
    is_write: _Field[int] = _Field()


class MemoryFaultExit(PayloadExit[abi.kvm_run_memory_fault], reason=ExitReason.MEMORY_FAULT):
    """KVM_EXIT_MEMORY_FAULT, kvm_run.memory_fault: gpa, size and flags (e.g. private vs shared)."""
    __slots__ = ()
    flags: _Field[int] = _Field()
    gpa: _Field[int] = _Field()
    size: _Field[int] = _Field()


class TdxExit(PayloadExit[abi.kvm_run_tdx], reason=ExitReason.TDX):
    """KVM_EXIT_TDX, kvm_run.tdx: a TDVMCALL from a TDX guest; nr says which member is meant."""
    __slots__ = ()
    flags: _Field[int] = _Field()
    nr: _Field[int] = _Field()
    unknown: _Field[abi.kvm_run_unknown] = _Field()
    get_quote: _Field[abi.kvm_run_get_quote] = _Field()
    get_tdvmcall_info: _Field[abi.kvm_run_get_tdvmcall_info] = _Field()
    setup_event_notify: _Field[abi.kvm_run_setup_event_notify] = _Field()


class ArmSeaExit(PayloadExit[abi.kvm_run_arm_sea], reason=ExitReason.ARM_SEA):
    """KVM_EXIT_ARM_SEA, kvm_run.arm_sea: a synchronous external abort handed to userspace."""
    __slots__ = ()
    flags: _Field[int] = _Field()
    esr: _Field[int] = _Field()
    gva: _Field[int] = _Field()
    gpa: _Field[int] = _Field()


class ArmLdst64bExit(_NisvExit, reason=ExitReason.ARM_LDST64B):
    """KVM_EXIT_ARM_LDST64B, kvm_run.arm_nisv: a 64-byte single-copy atomic access to emulate."""
    __slots__ = ()


class SnpReqCertsExit(PayloadExit[abi.kvm_exit_snp_req_certs], reason=ExitReason.SNP_REQ_CERTS):
    """KVM_EXIT_SNP_REQ_CERTS, kvm_run.snp_req_certs: an SEV-SNP guest asked for certificates."""
    __slots__ = ()
    gpa: _Field[int] = _Field()
    npages: _Field[int] = _Field()
    ret: _Field[int] = _Field()
