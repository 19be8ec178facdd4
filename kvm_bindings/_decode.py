"""Turning a vCPU's kvm_run page into exit objects (kvm_bindings.exits), and handing the
answer to a guest read back to the page before the next KVM_RUN. The hot path of run()."""

from __future__ import annotations

import ctypes
import errno
import struct
from typing import TYPE_CHECKING, Any

from . import abi
from ._layout import member, offset_of, unpacker
from .errors import KvmError
from .exits import EXIT_CLASSES, ExitReason, IoExit, MmioExit, PayloadExit, UnknownExit

if TYPE_CHECKING:
    from .exits import Exit
    from .vcpu import Vcpu


class _Decoder:
    """Turns the kvm_run page of one vCPU into Exit objects, and hands the answer to a
    guest read (IN, MMIO read) back to the page before the next KVM_RUN."""

    _io_off = offset_of(abi.kvm_run, "io")
    _io = unpacker(member(abi.kvm_run, "io")[1], ("direction", "size", "port", "count", "data_offset"))
    _mmio_off = offset_of(abi.kvm_run, "mmio")
    _mmio_type = member(abi.kvm_run, "mmio")[1]
    _mmio = unpacker(_mmio_type, ("phys_addr", "len", "is_write"))
    _mmio_data_off = _mmio_off + member(_mmio_type, "data")[0]
    _mmio_data_max = ctypes.sizeof(member(_mmio_type, "data")[1])
    _reason_fmt = unpacker(abi.kvm_run, ("exit_reason",))       # (these read from offset 0)
    # exit_reason and kvm_run.io's fields in one unpack: the commonest exit costs one call.
    _reason_io = struct.Struct(_reason_fmt.format + "x" * (_io_off - _reason_fmt.size)
                               + _io.format.lstrip("<"))
    _io_out = abi.KVM_EXIT_IO_OUT

    # Built once on first use. {reason: (offset in kvm_run, ctypes type of its member)}, and
    # {reason: (class, ExitReason, offset, member type or None for an exit without payload)}.
    _members: dict[int, tuple[int, Any]] = {}
    _plans: dict[int, tuple[type[Exit], ExitReason, int, Any]] = {}

    def __init__(self, vcpu: Vcpu, page: Any) -> None:
        self.vcpu = vcpu
        self.page = page
        self.size = len(page)
        # The pending answer to a guest read: (offset in the page, buffer, the view handed out)
        self.answer: tuple[int, bytearray, memoryview] | None = None
        if not _Decoder._plans:
            by_name = ExitReason.__members__
            _Decoder._members = {
                int(by_name[r[len("KVM_EXIT_"):]]): (offset_of(abi.kvm_run, m), member(abi.kvm_run, m)[1])
                for r, m in abi.EXIT_MEMBERS.items() if r[len("KVM_EXIT_"):] in by_name}
            plans = {}
            for r in ExitReason:
                # A reason with no class here (headers newer than this file) decodes as UnknownExit.
                cls = EXIT_CLASSES.get(r, UnknownExit)
                off, t = _Decoder._members.get(r, (0, None)) if issubclass(cls, PayloadExit) else (0, None)
                plans[int(r)] = (cls, r, off, t)
            _Decoder._plans = plans
        self.members = _Decoder._members
        self.plans = _Decoder._plans

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
        return int(self._reason_fmt.unpack_from(self.page)[0])

    def _outside(self, start: int, end: int) -> KvmError:
        # KVM never does this; a corrupted page (a fuzzer, a buggy kernel) must not make
        # the answer land outside the data area.
        return KvmError("KVM_RUN", errno.EIO, f"kvm_run names data at {start:#x}..{end:#x}, "
                                              f"outside the {self.size:#x}-byte vCPU mapping")

    def _answer(self, e: Any, start: int, end: int) -> None:
        """Give a guest read its answer buffer, delivered to the page by the next run()."""
        buf = bytearray(self.page[start:end])
        view = memoryview(buf)
        e._data = view
        e._vcpu = self.vcpu
        e._seq = self.vcpu._seq
        self.answer = (start, buf, view)

    def decode(self, reason: int | None = None) -> Exit:
        """The exit in the page, as KVM_RUN left it (reason: as if exit_reason said that)."""
        page = self.page
        at, direction, size, port, count, start = self._reason_io.unpack_from(page)
        if reason is None:
            reason = at
        if reason == _IO:
            e: Any = _new(IoExit)
            e.reason = _IO_REASON
            e.port = port
            e.size = size
            e.count = count
            end = start + size * count      # both unsigned: only the end can be out of range
            if end > self.size:
                raise self._outside(start, end)
            if direction == self._io_out:
                e.is_write = True
                e._data = page[start:end]
                e._vcpu = None
            else:
                e.is_write = False
                self._answer(e, start, end)
            return e  # type: ignore[no-any-return]
        if reason == _MMIO:
            phys, length, is_write = self._mmio.unpack_from(page, self._mmio_off)
            m: Any = _new(MmioExit)
            m.reason = _MMIO_REASON
            m.phys_addr = phys
            start = self._mmio_data_off
            end = start + min(length, self._mmio_data_max)
            if is_write:
                m.is_write = True
                m._data = page[start:end]
                m._vcpu = None
            else:
                m.is_write = False
                self._answer(m, start, end)
            return m  # type: ignore[no-any-return]
        plan = self.plans.get(reason)
        if plan is None:
            u = UnknownExit.__new__(UnknownExit)
            u.reason = reason
            return u
        cls, known, off, t = plan
        obj: Any = cls.__new__(cls)
        obj.reason = known
        if t is not None:
            obj._payload = t.from_buffer_copy(self.page, off)
            obj._vcpu = self.vcpu
            obj._seq = self.vcpu._seq
        return obj  # type: ignore[no-any-return]

    def live_member(self, reason: int) -> Any:
        off, t = self.members[int(reason)]
        return t.from_buffer(self.page, off)


_IO = int(ExitReason.IO)
_MMIO = int(ExitReason.MMIO)
_IO_REASON = ExitReason.IO
_MMIO_REASON = ExitReason.MMIO
_new = object.__new__
_GONE_PAGE = b""      # a closed vCPU's decoder reads nothing
