"""Decoded KVM_RUN exits: one small object per exit, carrying its kvm_run member's fields.

Which member each exit reason fills comes from the header itself (abi.EXIT_MEMBERS,
read from the comments in struct kvm_run). IO and MMIO exits are decoded with
precomputed unpackers.

Lifetime, one rule: an exit is a snapshot of kvm_run taken when run() returned,
and it never changes afterwards. What it carries (port, data of a write, the
payload's fields) stays readable for as long as you keep the object. Its answer
(the data of an IN or MMIO read, which you fill in; reply()) is handed to the
kernel by that vCPU's next run(), so answering is only possible until then:
after the next run() (or close()) the answer buffer and reply() raise
StaleExitError, and no exit can reach another exit's bytes.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from typing import Any

from . import abi
from ._layout import fill, member, offset_of, unpacker
from .errors import KvmError, StaleExitError

ExitReason = abi.ExitReason


class Exit:
    """Base of every exit: .reason is an ExitReason (or a plain int for UnknownExit)."""

    __slots__ = ("reason",)
    reason: Any

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in _all_slots(type(self))
                           if not n.startswith("_") and n != "reason")
        name = getattr(self.reason, "name", self.reason)
        return f"<{type(self).__name__} {name}{': ' + fields if fields else ''}>"


def _all_slots(cls: type) -> list[str]:
    out: list[str] = []
    for c in reversed(cls.__mro__):
        out += [s for s in getattr(c, "__slots__", ()) if s not in out]
    return out


class _DataExit(Exit):
    """An exit with a data buffer: a copy for guest writes, an answer buffer for guest reads."""

    __slots__ = ("is_write", "_data", "_vcpu", "_seq")
    is_write: bool
    _data: Any
    _vcpu: Any
    _seq: int

    @property
    def data(self) -> bytes | memoryview:
        """For a guest write: the bytes written (a copy, valid for good). For a guest read: a
        writable buffer whose bytes the guest receives on the next run(); StaleExitError after."""
        vcpu = self._vcpu
        if vcpu is not None and vcpu._seq != self._seq:
            raise StaleExitError(f"this {type(self).__name__} is stale: vCPU {vcpu.id} ran again "
                                 f"(or closed) since, and its answer was delivered then")
        return self._data  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        base = super().__repr__()[:-1]
        vcpu = self._vcpu
        shown = "<stale>" if vcpu is not None and vcpu._seq != self._seq else bytes(self._data)
        return f"{base}, data={shown!r}>"


class IoExit(_DataExit):
    """KVM_EXIT_IO: port I/O. data holds size*count bytes (all elements of a rep string op):
    for OUT the bytes written, for IN a writable buffer whose bytes become the guest's input."""

    __slots__ = ("port", "size", "count")
    port: int
    size: int
    count: int


class MmioExit(_DataExit):
    """KVM_EXIT_MMIO: an access to guest-physical memory no slot backs (or a write to a
    read-only slot). data is exactly len bytes; for a read, the buffer the guest receives."""

    __slots__ = ("phys_addr",)
    phys_addr: int


class PayloadExit(Exit):
    """An exit whose kvm_run member is copied out as a ctypes struct: .payload, and its
    fields as attributes (exit.pc, exit.suberror, ...)."""

    __slots__ = ("_payload", "_vcpu", "_seq")
    _payload: Any
    _vcpu: Any
    _seq: int

    @property
    def payload(self) -> Any:
        return self._payload

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return getattr(self._payload, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}") from None

    def _write_back(self, **fields: int) -> None:
        """Set fields of this exit's kvm_run member in the live kvm_run: the answer
        the kernel reads on the next KVM_RUN. Only until then: after it, StaleExitError."""
        vcpu = self._vcpu
        checked = fill(type(self._payload)(), **fields)   # range-checked before any write
        # Holding the run lock, no run() can start between the staleness check and the write.
        with vcpu._between_runs(f"reply() to a {type(self).__name__}"):
            if vcpu._seq != self._seq:
                raise StaleExitError(f"reply() to a stale {type(self).__name__}: vCPU {vcpu.id} "
                                     f"ran again (or closed) since; the guest has moved on")
            live = vcpu._run_member(self.reason)
            for k in fields:
                value = getattr(checked, k)
                setattr(self._payload, k, value)
                setattr(live, k, value)

    def __repr__(self) -> str:
        p = self._payload
        if hasattr(p, "_fields_"):
            fields = ", ".join(f"{name}={_plain(getattr(p, name))}" for name, *_ in p._fields_
                               if not name.startswith("_"))
        else:    # a scalar member, such as s390_reset_flags
            fields = f"value={_plain(p.value)}"
        return f"<{type(self).__name__} {self.reason.name}{': ' + fields if fields else ''}>"


def _plain(value: Any) -> str:
    if isinstance(value, ctypes.Array):
        return repr(list(value))
    if isinstance(value, (ctypes.Structure, ctypes.Union)):
        return "{...}"
    return repr(value)


class FailEntryExit(PayloadExit):
    """KVM_EXIT_FAIL_ENTRY: VM entry failed; hardware_entry_failure_reason says why."""
    __slots__ = ()


class InternalErrorExit(PayloadExit):
    """KVM_EXIT_INTERNAL_ERROR: suberror (abi.InternalError) and ndata words of data."""
    __slots__ = ()

    @property
    def suberror(self) -> Any:
        try:
            return abi.InternalError(self._payload.suberror)
        except ValueError:
            return int(self._payload.suberror)

    @property
    def data(self) -> list[int]:
        return [int(x) for x in self._payload.data[:self._payload.ndata]]


class SystemEventExit(PayloadExit):
    """KVM_EXIT_SYSTEM_EVENT: shutdown, reset, crash... (abi.SystemEvent) with ndata words."""
    __slots__ = ()

    @property
    def type(self) -> Any:
        try:
            return abi.SystemEvent(self._payload.type)
        except ValueError:
            return int(self._payload.type)

    @property
    def data(self) -> list[int]:
        return [int(x) for x in self._payload.data[:self._payload.ndata]]


class DebugExit(PayloadExit):
    """KVM_EXIT_DEBUG: a single-step, breakpoint or watchpoint (arch fields in .arch)."""
    __slots__ = ()


class MsrExit(PayloadExit):
    """KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR (KVM_CAP_X86_USER_SPACE_MSR): .index,
    .data, .reason; answer with reply() before the next run."""
    __slots__ = ()

    def reply(self, data: int | None = None, error: bool = False) -> None:
        """For RDMSR, the value the guest reads; error=True injects #GP instead."""
        if data is not None:
            self._write_back(data=data, error=int(error))
        else:
            self._write_back(error=int(error))


class HypercallExit(PayloadExit):
    """KVM_EXIT_HYPERCALL: nr and args; reply(ret) sets the guest's return value."""
    __slots__ = ()

    def reply(self, ret: int) -> None:
        self._write_back(ret=ret)


class MemoryFaultExit(PayloadExit):
    """KVM_EXIT_MEMORY_FAULT: gpa, size and flags (e.g. private vs shared mismatch)."""
    __slots__ = ()


class SimpleExit(Exit):
    """An exit that carries nothing but its reason (HLT, SHUTDOWN, IRQ_WINDOW_OPEN, ...)."""
    __slots__ = ()


class InterruptedExit(SimpleExit):
    """KVM_RUN returned EINTR: a signal, kick() or immediate_exit. Run again to continue."""
    __slots__ = ()


class UnknownExit(Exit):
    """An exit reason these bindings do not know (a newer kernel's): .reason is the int."""
    __slots__ = ()


_SPECIAL: dict[str, type[PayloadExit]] = {
    "FAIL_ENTRY": FailEntryExit, "INTERNAL_ERROR": InternalErrorExit,
    "SYSTEM_EVENT": SystemEventExit, "DEBUG": DebugExit, "X86_RDMSR": MsrExit,
    "X86_WRMSR": MsrExit, "HYPERCALL": HypercallExit, "MEMORY_FAULT": MemoryFaultExit,
}


def _class_name(reason: Any) -> str:
    if reason.name == "UNKNOWN":     # KVM_EXIT_UNKNOWN: a hardware exit KVM itself did not know
        return "UnknownHardwareExit"
    return "".join(p.capitalize() for p in reason.name.split("_")) + "Exit"


# One class per exit reason, so isinstance() and repr() say which exit it was.
EXIT_CLASSES: dict[int, type[Exit]] = {}
for _reason in ExitReason:
    if _reason.name == "IO":
        EXIT_CLASSES[_reason] = IoExit
    elif _reason.name == "MMIO":
        EXIT_CLASSES[_reason] = MmioExit
    elif _reason.name == "INTR":
        EXIT_CLASSES[_reason] = InterruptedExit
    elif f"KVM_EXIT_{_reason.name}" in abi.EXIT_MEMBERS:
        base = _SPECIAL.get(_reason.name, PayloadExit)
        EXIT_CLASSES[_reason] = type(_class_name(_reason), (base,), {"__slots__": ()})
    else:
        EXIT_CLASSES[_reason] = type(_class_name(_reason), (SimpleExit,), {"__slots__": ()})
globals().update({c.__name__: c for c in EXIT_CLASSES.values()})
HltExit: type[Exit] = EXIT_CLASSES[ExitReason.HLT]
ShutdownExit: type[Exit] = EXIT_CLASSES[ExitReason.SHUTDOWN]


class Decoder:
    """Turns the kvm_run page of one vCPU into Exit objects, and hands the answer to a
    guest read (IN, MMIO read) back to the page before the next KVM_RUN."""

    _io_off = offset_of(abi.kvm_run, "io")
    _io = unpacker(member(abi.kvm_run, "io")[1], ("direction", "size", "port", "count", "data_offset"))
    _mmio_off = offset_of(abi.kvm_run, "mmio")
    _mmio_type = member(abi.kvm_run, "mmio")[1]
    _mmio = unpacker(_mmio_type, ("phys_addr", "len", "is_write"))
    _mmio_data_off = _mmio_off + member(_mmio_type, "data")[0]
    _mmio_data_max = ctypes.sizeof(member(_mmio_type, "data")[1])
    _reason_at = offset_of(abi.kvm_run, "exit_reason")
    _reason_fmt = struct.Struct("<I")
    _io_out = abi.KVM_EXIT_IO_OUT

    # {reason: (offset in kvm_run, ctypes type of the member)}, built once on first use
    _members: dict[int, tuple[int, Any]] = {}
    _reasons: dict[int, Any] = {}

    def __init__(self, vcpu: Any, page: Any) -> None:
        self.vcpu = vcpu
        self.page = page
        self.size = len(page)
        # The pending answer to a guest read: (offset in the page, buffer, the view handed out)
        self.answer: tuple[int, bytearray, memoryview] | None = None
        if not Decoder._reasons:
            by_name = ExitReason.__members__
            Decoder._members = {
                int(by_name[r[len("KVM_EXIT_"):]]): (offset_of(abi.kvm_run, m), member(abi.kvm_run, m)[1])
                for r, m in abi.EXIT_MEMBERS.items() if r[len("KVM_EXIT_"):] in by_name}
            Decoder._reasons = {int(r): r for r in ExitReason}
        self.members = Decoder._members
        self.reasons = Decoder._reasons

    def deliver(self) -> None:
        """Copy the answer into kvm_run and retire the buffer handed out for it."""
        assert self.answer is not None
        start, buf, view = self.answer
        self.answer = None
        self.page[start:start + len(buf)] = buf
        try:
            view.release()     # a view still held now raises instead of silently going nowhere
        except BufferError:
            pass               # re-exported by the caller: it only ever reaches buf, not the page

    def release(self) -> None:
        self.answer = None
        self.page = _GONE_PAGE

    def reason(self) -> int:
        return int(self._reason_fmt.unpack_from(self.page, self._reason_at)[0])

    def _buffer(self, e: Any, start: int, end: int, is_write: bool) -> None:
        """The exit's data: a copy of a write, or the answer buffer of a read."""
        if not 0 <= start <= end <= self.size:
            # KVM never does this; a corrupted page (a fuzzer, a buggy kernel) must not make
            # the answer land outside the data area.
            raise KvmError("KVM_RUN", errno.EIO, f"kvm_run names data at {start:#x}..{end:#x}, "
                                                 f"outside the {self.size:#x}-byte vCPU mapping")
        if is_write:
            e._data = self.page[start:end]
            e._vcpu = None
        else:
            buf = bytearray(self.page[start:end])
            view = memoryview(buf)
            e._data = view
            e._vcpu = self.vcpu
            e._seq = self.vcpu._seq
            self.answer = (start, buf, view)

    def decode(self, reason: int) -> Exit:
        if reason == _IO:
            direction, size, port, count, data_offset = self._io.unpack_from(self.page, self._io_off)
            e: Any = IoExit.__new__(IoExit)
            e.reason, e.port, e.size, e.count = ExitReason.IO, port, size, count
            e.is_write = is_write = direction == self._io_out
            self._buffer(e, data_offset, data_offset + size * count, is_write)
            return e  # type: ignore[no-any-return]
        if reason == _MMIO:
            phys, length, is_write = self._mmio.unpack_from(self.page, self._mmio_off)
            m: Any = MmioExit.__new__(MmioExit)
            m.reason, m.phys_addr, m.is_write = ExitReason.MMIO, phys, bool(is_write)
            start = self._mmio_data_off
            self._buffer(m, start, start + min(length, self._mmio_data_max), m.is_write)
            return m  # type: ignore[no-any-return]
        known = self.reasons.get(reason)
        if known is None:
            u = UnknownExit.__new__(UnknownExit)
            u.reason = reason
            return u
        cls = EXIT_CLASSES[known]
        obj: Any = cls.__new__(cls)
        obj.reason = known
        if isinstance(obj, PayloadExit):
            off, t = self.members[reason]
            obj._payload = t.from_buffer_copy(self.page, off)
            obj._vcpu = self.vcpu
            obj._seq = self.vcpu._seq
        return obj  # type: ignore[no-any-return]

    def live_member(self, reason: int) -> Any:
        off, t = self.members[int(reason)]
        return t.from_buffer(self.page, off)


_IO = int(ExitReason.IO)
_MMIO = int(ExitReason.MMIO)
_GONE_PAGE = b""      # a closed vCPU's decoder reads nothing
