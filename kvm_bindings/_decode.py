"""Turning a vCPU's kvm_run page into exit objects (kvm_bindings.exits), and handing the
answer to a guest read back to the page before the next KVM_RUN. IO and MMIO exits, the hot
path, are decoded by Vcpu.run() itself with the unpackers made here."""

from __future__ import annotations

import ctypes
import errno
import struct
from typing import TYPE_CHECKING, Any

from . import abi
from ._layout import member, offset_of, unpacker
from .errors import KvmError
from .exits import _STALE_ANSWER, EXIT_CLASSES, ExitReason, PayloadExit, UnknownExit

if TYPE_CHECKING:
    from .exits import Exit
    from .vcpu import Vcpu


class _Decoder:
    """The parts of turning a vCPU's kvm_run page into Exit objects that are not run()'s
    hot path: every exit but IO and MMIO (which run() decodes itself, one unpack each),
    answer buffers for guest reads, and handing the answer back to the page."""

    _io_off = offset_of(abi.kvm_run, "io")
    _io = unpacker(member(abi.kvm_run, "io")[1], ("direction", "size", "port", "count", "data_offset"))
    _mmio_off = offset_of(abi.kvm_run, "mmio")
    _mmio_type = member(abi.kvm_run, "mmio")[1]
    _mmio = unpacker(_mmio_type, ("phys_addr", "len", "is_write"))
    _mmio_data_off = _mmio_off + member(_mmio_type, "data")[0]
    _mmio_data_max = ctypes.sizeof(member(_mmio_type, "data")[1])
    _reason_fmt = unpacker(abi.kvm_run, ("exit_reason",))       # (these read from offset 0)
    # exit_reason and kvm_run.io's fields in one unpack: the commonest exit costs one call.
    reason_io = struct.Struct(_reason_fmt.format + "x" * (_io_off - _reason_fmt.size)
                              + _io.format.lstrip("<"))
    reason_mmio = struct.Struct(_reason_fmt.format + "x" * (_mmio_off - _reason_fmt.size)
                                + _mmio.format.lstrip("<"))

    # Built once on first use. {reason: (offset in kvm_run, ctypes type of its member)}, and
    # {reason: (class, ExitReason, offset, member type or None for an exit without payload)}.
    _members: dict[int, tuple[int, Any]] = {}
    _plans: dict[int, tuple[type[Exit], ExitReason, int, Any]] = {}

    def __init__(self, vcpu: Vcpu, page: Any) -> None:
        self.vcpu = vcpu
        self.page = page
        self.size = len(page)
        # The pending answer to a guest read: (offset in the page, its length, buffer, the
        # view of it handed out as the exit's data)
        self.answer: tuple[int, int, bytearray, memoryview] | None = None
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

    def retire(self, exit: Exit, deliver: bool) -> None:
        """The vCPU is about to run again (deliver: the answer goes to the page) or is
        closing (it goes nowhere): exit, its pending one, can no longer be answered."""
        answer, self.answer = self.answer, None
        if answer is None:
            return                 # a PayloadExit: reply() checks vcpu._pending itself
        start, length, buf, view = answer
        e: Any = exit
        data = e.data
        e.data = _STALE_ANSWER
        try:
            view.release()         # a view still held now raises instead of silently going nowhere
        except BufferError:
            pass                   # re-exported by the caller: it only ever reaches buf, not the page
        if not deliver:
            return
        # The answer is what data holds now: the buffer handed out, or what the caller put in
        # its place (e.data = b"Z"). Exactly the bytes the guest reads, or refused: never
        # silently lost, never spilling past the data area (a buffer grown after its view
        # was released).
        source = buf if data is view else data
        try:
            answer_view = memoryview(source).cast("B")
        except TypeError:
            raise TypeError(f"the answer to a guest read must be bytes-like, and "
                            f"{type(exit).__name__}.data was set to a {type(source).__name__}: "
                            f"not delivered") from None
        if answer_view.nbytes != length:
            raise ValueError(f"the guest read {length} byte(s), and the answer in "
                             f"{type(exit).__name__}.data is {answer_view.nbytes}: not delivered")
        self.page[start:start + length] = answer_view

    def release(self) -> None:
        self.answer = None
        self.page = _GONE_PAGE

    def reason(self) -> int:
        return int(self._reason_fmt.unpack_from(self.page)[0])

    def outside(self, start: int, end: int) -> KvmError:
        # KVM never does this; a corrupted page (a fuzzer, a buggy kernel) must not make
        # the answer land outside the data area.
        return KvmError("KVM_RUN", errno.EIO, f"kvm_run names data at {start:#x}..{end:#x}, "
                                              f"outside the {self.size:#x}-byte vCPU mapping")

    def answer_buffer(self, e: Any, start: int, end: int) -> None:
        """Give a guest read its answer buffer, delivered to the page by the next run()."""
        buf = bytearray(self.page[start:end])
        view = memoryview(buf)
        e.data = view
        self.answer = (start, end - start, buf, view)
        self.vcpu._pending = e

    def decode(self, reason: int) -> Exit:
        """An exit that is neither IO nor MMIO (run() decodes those), as the page has it."""
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
            self.vcpu._pending = obj
        return obj  # type: ignore[no-any-return]

    def live_member(self, reason: int) -> Any:
        off, t = self.members[int(reason)]
        return t.from_buffer(self.page, off)


_GONE_PAGE = b""      # a closed vCPU's decoder reads nothing
