"""The host side of the ucall protocol: run a vCPU and turn its ucalls into Python events.

A ucall is one 4-byte OUT to UCALL_PORT whose value is the guest-physical address of a
64-byte record in guest memory (kvm_ucall.h lays it out and documents it): a command,
the guest's __FILE__ and __LINE__, a text (format or condition) and up to four values.
ucalls() runs the vCPU and yields Sync, Print and finally Done; a failed GUEST_ASSERT
raises GuestAssertionError; any other exit goes to a handler, or fails the run.
Every run is bounded (max_exits, and a timeout after which the vCPU is kicked), so a
guest that never reaches GUEST_DONE fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import math
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType

from ..errors import StaleHandleError
from ..exits import Exit, InterruptedExit, IoExit
from ..vcpu import Vcpu

__all__ = ["MAX_EXITS", "RECORD_SIZE", "TIMEOUT", "UCALL_PORT", "Done", "Event",
           "GuestAssertionError", "GuestTimeoutError", "Print", "Sync", "UcallError",
           "UnexpectedExitError", "read_ucall", "run_guest", "ucalls"]

UCALL_PORT = 0xE7           # kvm_ucall.h's UCALL_PORT
RECORD_SIZE = 64
MAX_EXITS = 10_000          # exits of all kinds one ucalls() run may take
TIMEOUT = 10.0              # seconds of guest running time, likewise
_MAGIC = 0x4C414355         # "UCAL"
_HEADER = struct.Struct("<IBBBBIIII4QQ")
_SYNC, _PRINT, _ASSERT, _DONE = 1, 2, 3, 4
_OP_NONE, _OP_CC = 0, 7
# The comparison each GUEST_ASSERT_xx checks, and what a failure shows between the values.
_OPS = {1: ("==", "!="), 2: ("!=", "=="), 3: ("<", ">="), 4: ("<=", ">"), 5: (">", "<="),
        6: (">=", "<")}
_STRING_MAX = 4096


@dataclass(frozen=True)
class Sync:
    """GUEST_SYNC(value): value is unsigned, of the guest mode's width."""
    value: int
    file: str
    line: int


@dataclass(frozen=True)
class Print:
    """GUEST_PRINT(text) or GUEST_PRINTF(fmt, values...): text is fmt % values."""
    text: str
    file: str
    line: int


@dataclass(frozen=True)
class Done:
    """GUEST_DONE: the guest finished; ucalls() ends after yielding it."""
    file: str
    line: int


Event = Sync | Print | Done


class UcallError(Exception):
    """A ucall whose record is not one (bad magic, command, address or format)."""


class GuestAssertionError(AssertionError):
    """A GUEST_ASSERT* or GUEST_FAIL in the guest failed: file and line are the guest's source.

    values are the operands (left, right for GUEST_ASSERT_EQ and its kind)."""

    def __init__(self, file: str, line: int, detail: str, values: tuple[int, ...]) -> None:
        self.file, self.line, self.detail, self.values = file, line, detail, values
        super().__init__(f"guest assertion failed at {file}:{line}: {detail}")


class GuestTimeoutError(AssertionError):
    """The guest did not reach GUEST_DONE within max_exits exits or timeout seconds."""


class UnexpectedExitError(AssertionError):
    """An exit that is not a ucall and that no handler took: .exit is it."""

    def __init__(self, exit: Exit, where: str) -> None:
        self.exit = exit
        super().__init__(f"unexpected exit {exit!r}{where} (pass handler= to ucalls() or "
                         "run_guest() to take exits like this one)")


Handler = Callable[[Exit], object]


def ucalls(vcpu: Vcpu, *, handler: Handler | None = None, max_exits: int = MAX_EXITS,
           timeout: float = TIMEOUT, port: int = UCALL_PORT) -> Iterator[Event]:
    """Run vcpu, yielding each Sync and Print, then Done, after which the iterator ends.

    The guest resumes when the next event is asked for. A failed GUEST_ASSERT raises
    GuestAssertionError. Any other exit goes to handler(exit): a true result means it
    was handled and the guest resumes; without a handler, or on a false result,
    UnexpectedExitError. More than max_exits exits, or more than timeout seconds of
    running (the vCPU is kicked then), raises GuestTimeoutError.

    The arguments are checked here, before anything runs: TypeError or ValueError for a
    bad one (max_exits a positive int, timeout a positive finite number of seconds, port
    a 16-bit port), StaleHandleError for a closed vCPU or a vCPU of a closed VM.
    """
    _check_arguments(vcpu, handler, max_exits, timeout, port)
    return _ucalls(vcpu, handler, max_exits, float(timeout), port)


def _check_arguments(vcpu: Vcpu, handler: Handler | None, max_exits: int, timeout: float,
                     port: int) -> None:
    if not isinstance(vcpu, Vcpu):
        raise TypeError(f"ucalls() runs a Vcpu, not {type(vcpu).__name__}")
    if handler is not None and not callable(handler):
        raise TypeError(f"handler must be callable or None, not {type(handler).__name__}")
    if not isinstance(max_exits, int) or isinstance(max_exits, bool):
        raise TypeError(f"max_exits must be an int, not {type(max_exits).__name__}")
    if max_exits < 1:
        raise ValueError(f"max_exits must be at least 1, not {max_exits}")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive, finite number of seconds, not {timeout!r}")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"port must be an I/O port from 0 to 0xffff, not {port!r}")
    for handle in (vcpu.vm, vcpu):       # .fd: StaleHandleError once closed
        _ = handle.fd


def _ucalls(vcpu: Vcpu, handler: Handler | None, max_exits: int, timeout: float,
            port: int) -> Iterator[Event]:
    exits, left = 0, timeout
    while True:
        with _Watchdog(vcpu, left) as dog:
            while True:
                if exits >= max_exits:
                    raise GuestTimeoutError(f"the guest did not reach GUEST_DONE within {max_exits} "
                                            f"exits{_where(vcpu)}")
                exit = vcpu.run()
                exits += 1
                if isinstance(exit, InterruptedExit):
                    if dog.fired:
                        raise GuestTimeoutError(f"the guest did not reach GUEST_DONE within "
                                                f"{timeout:g} s{_where(vcpu)}")
                    continue    # a signal of someone else's: run on
                if (isinstance(exit, IoExit) and exit.port == port and exit.is_write
                        and exit.size == 4 and exit.count == 1):
                    event = read_ucall(vcpu, int.from_bytes(exit.data, "little"))
                    break
                if handler is not None and handler(exit):
                    continue
                raise UnexpectedExitError(exit, _where(vcpu))
        left -= dog.elapsed
        yield event
        if isinstance(event, Done):
            return


def run_guest(vcpu: Vcpu, *, handler: Handler | None = None, max_exits: int = MAX_EXITS,
              timeout: float = TIMEOUT, port: int = UCALL_PORT) -> list[Sync | Print]:
    """Run vcpu to GUEST_DONE: the Sync and Print events on the way, in order. As ucalls()."""
    return [e for e in ucalls(vcpu, handler=handler, max_exits=max_exits, timeout=timeout, port=port)
            if not isinstance(e, Done)]


def read_ucall(vcpu: Vcpu, gpa: int) -> Event:
    """The ucall whose record is at gpa: its event, or GuestAssertionError for a failed assert."""
    memory = vcpu.vm.memory
    try:
        raw = memory.read(gpa, RECORD_SIZE)
    except ValueError as e:
        raise UcallError(f"a ucall gave the address {gpa:#x}, which guest memory does not back: "
                         f"{e}") from None
    (magic, command, width, count, op, line, file_at, text_at, right_at, *rest) = _HEADER.unpack(raw)
    if magic != _MAGIC:
        raise UcallError(f"no ucall record at {gpa:#x} (magic {magic:#x}, not {_MAGIC:#x})")
    if width not in (2, 4, 8) or count > 4:
        raise UcallError(f"the ucall record at {gpa:#x} has width {width} and {count} values")
    mask = (1 << 8 * width) - 1
    values = tuple(v & mask for v in rest[:count])
    file = _string(vcpu, file_at)
    text = _string(vcpu, text_at)
    if command == _SYNC and count == 1:
        return Sync(values[0], file, line)
    if command == _PRINT:
        return Print(_format(text, values, file, line), file, line)
    if command == _DONE:
        return Done(file, line)
    if command == _ASSERT:
        raise GuestAssertionError(file, line, _assertion(op, text, _string(vcpu, right_at), values,
                                                          file, line), values)
    raise UcallError(f"{file}:{line}: a ucall with command {command} and {count} values")


def _string(vcpu: Vcpu, gpa: int) -> str:
    """The NUL-terminated string at gpa (empty for address 0), read at most _STRING_MAX bytes."""
    if gpa == 0:
        return ""
    memory = vcpu.vm.memory
    out = bytearray()
    while len(out) < _STRING_MAX:
        try:
            chunk = memory.read(gpa + len(out), 1)
        except ValueError:      # GuestMemoryError: no RAM there
            where = "is outside guest memory" if not out else f"runs off guest memory after {len(out)} bytes"
            raise UcallError(f"a ucall's string at {gpa:#x} {where}") from None
        if chunk == b"\0":
            return out.decode(errors="replace")
        out += chunk
    raise UcallError(f"the string at {gpa:#x} has no NUL in {_STRING_MAX} bytes")


def _format(text: str, values: tuple[int, ...], file: str, line: int) -> str:
    if not values:
        return text
    try:
        return text % values
    except (TypeError, ValueError) as e:
        raise UcallError(f"{file}:{line}: format {text!r} with values {values}: {e}") from None


def _assertion(op: int, text: str, right: str, values: tuple[int, ...], file: str, line: int) -> str:
    if op in _OPS and len(values) == 2:
        holds, fails = _OPS[op]
        a, b = values
        return f"{text} {holds} {right} ({a:#x} {fails} {b:#x})"
    if op == _OP_CC:
        return f"GUEST_ASSERT({text}): condition {text!r} (j{text}) does not hold"
    return _format(text, values, file, line) if text else "GUEST_FAIL"


def _where(vcpu: Vcpu) -> str:
    """", guest rip=0x..." where the arch has registers to read, else nothing."""
    get_regs = getattr(vcpu, "get_regs", None)
    if get_regs is None:
        return ""
    try:
        return f", guest rip={get_regs().rip:#x}"
    except Exception:   # the report must not hide the failure it reports
        return ""


class _Watchdog:
    """Kick vcpu once after seconds; .fired says whether it did, .elapsed how long it ran.

    On exit a kick that landed after the run stopped is taken back (immediate_exit cleared),
    so it cannot cut short the caller's next run()."""

    def __init__(self, vcpu: Vcpu, seconds: float) -> None:
        self.vcpu, self.seconds = vcpu, max(seconds, 0.0)
        self.fired = False
        self.elapsed = 0.0
        self._lock = threading.Lock()
        self._done = False
        self._timer = threading.Timer(self.seconds, self._kick)
        self._timer.daemon = True
        self._start = 0.0

    def _kick(self) -> None:
        with self._lock:
            if not self._done:
                self.fired = True
                # A vCPU closed under the run: its run() raises StaleHandleError, nothing to kick.
                with contextlib.suppress(StaleHandleError):
                    self.vcpu.kick()

    def __enter__(self) -> _Watchdog:
        self._start = time.monotonic()
        self._timer.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        with self._lock:
            self._done = True
        self._timer.cancel()
        self._timer.join()
        self.elapsed = time.monotonic() - self._start
        if self.fired and not self.vcpu.closed:
            self.vcpu.immediate_exit = False
