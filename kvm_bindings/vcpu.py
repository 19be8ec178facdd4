"""Vcpu: a "kvm-vcpu" fd (kvm_vcpu_ioctl) and its shared kvm_run page."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

from . import _requests, abi
from ._decode import _Decoder
from ._fd import _ioctl_unconverted as _ioctl
from ._layout import check_field, check_int, fill, member, offset_of
from .device import DeviceAttributes
from .dirty import _harvest_ring
from .errors import KvmError, StaleExitError, StaleHandleError, VcpuBusyError
from .exits import Exit, ExitReason, InterruptedExit, IoExit, MmioExit
from .stats import Stats

if TYPE_CHECKING:
    from .vm import Vm

__all__ = ["CLOSE_TIMEOUT", "KICK_SIGNAL", "Vcpu", "map_run_page", "reg_size", "size_code"]

_C = TypeVar("_C", bound="Vcpu")

# kick() interrupts KVM_RUN with this signal; any handler will do, what matters
# is that the signal is neither ignored nor fatal, so KVM_RUN returns EINTR.
KICK_SIGNAL = signal.SIGRTMIN
_kick_ready = False
_kick_lock = threading.Lock()


def _install_kick_handler() -> bool:
    global _kick_ready
    with _kick_lock:
        if _kick_ready:
            return True
        current = signal.getsignal(KICK_SIGNAL)
        if current not in (signal.SIG_DFL, signal.SIG_IGN, None):
            _kick_ready = True     # someone else's handler interrupts KVM_RUN just as well
            return True
        if threading.current_thread() is not threading.main_thread():
            return False
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        _kick_ready = True
        return True


_IMMEDIATE_EXIT = offset_of(abi.kvm_run, "immediate_exit")
_get_ident = threading.get_ident


def _run_ioctl_ctypes(fd: int, number: ctypes.c_ulong) -> None:
    if _ioctl(fd, number, None) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# KVM_RUN, the call made millions of times. fcntl.ioctl makes it in about half the user-space
# instructions of a ctypes call, releases the GIL, and reports EINTR as InterruptedError,
# which kick() needs. From CPython 3.14 on, fcntl.ioctl retries EINTR itself (gh-132742):
# with immediate_exit set, KVM_RUN would fail that way for ever, so there the call goes
# through ctypes (without argtypes, its cheapest form: see _fd._ioctl_unconverted).
# tests/test_threads.py checks on the running interpreter that a kick comes back as EINTR.
# Both tricks below (fcntl.ioctl for KVM_RUN, exits refilled by reference count) rest on
# CPython behaviour checked up to 3.13; 3.14 changed both.
_CPYTHON_BEFORE_3_14 = sys.implementation.name == "cpython" and sys.version_info < (3, 14)
_run_ioctl: Callable[[int, Any], Any]
_KVM_RUN: Any
if _CPYTHON_BEFORE_3_14:
    _run_ioctl, _KVM_RUN = fcntl.ioctl, abi.KVM_RUN
else:
    _run_ioctl, _KVM_RUN = _run_ioctl_ctypes, ctypes.c_ulong(abi.KVM_RUN)

# What run() decodes in its own frame: IO and MMIO exits.
_unpack_reason_io = _Decoder.reason_io.unpack_from
_unpack_reason_mmio = _Decoder.reason_mmio.unpack_from
_MMIO_DATA_OFF = _Decoder._mmio_data_off
_MMIO_DATA_MAX = _Decoder._mmio_data_max
_IO, _MMIO = int(ExitReason.IO), int(ExitReason.MMIO)
_IO_REASON, _MMIO_REASON, _INTR = ExitReason.IO, ExitReason.MMIO, ExitReason.INTR
_IO_OUT = abi.KVM_EXIT_IO_OUT
_IoExit, _MmioExit, _InterruptedExit = IoExit, MmioExit, InterruptedExit

# run() hands out a new IoExit or MmioExit on every exit, and making one costs more than the
# rest of decoding it. Yet in the usual loop (e = vcpu.run(); ...) the exit of two runs ago
# is held by nobody but the vCPU once the next run() starts. CPython's reference count tells
# that for certain (the vCPU's attribute, run()'s local and getrefcount's own argument: 3),
# and an object nobody else can reach can be filled in again without anyone seeing it
# change. Held anywhere else (a list, a variable, another thread's frame), it is never
# reused. Elsewhere (PyPy, free-threaded builds) there is no such certainty: always new.
_UNSHARED = 3
_refcount: Callable[[object], int]
if _CPYTHON_BEFORE_3_14 and getattr(sys, "_is_gil_enabled", lambda: True)():  # 3.14 borrows refs
    _refcount = sys.getrefcount
else:
    def _refcount(obj: object) -> int:
        return 0
_NOBODYS: Any = object()    # the first spares: the module holds it too, so its count is never 3
# How long close() waits for a kicked vCPU to leave KVM_RUN. One that does not (its
# thread blocks the kick signal and the guest never exits) is closed by run() itself
# when it returns; the VM's memory is safe meanwhile, its slots are deleted first.
CLOSE_TIMEOUT = 2.0


# What a closed vCPU's page is replaced by: a mapping that says it is closed.
_GONE = mmap.mmap(-1, mmap.PAGESIZE)
_GONE.close()


def map_run_page(fd: int, size: int) -> mmap.mmap:
    """The vCPU's shared kvm_run page (and the rings after it): mmap of its fd at offset 0."""
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def size_code(nbytes: int) -> int:
    """The KVM_REG_SIZE_* field for a register of nbytes (a power of two, 1 to 256)."""
    code = nbytes.bit_length() - 1
    if nbytes <= 0 or nbytes & (nbytes - 1) or code << abi.KVM_REG_SIZE_SHIFT & ~abi.KVM_REG_SIZE_MASK:
        raise ValueError(f"a ONE_REG register cannot be {nbytes} bytes")
    return code << abi.KVM_REG_SIZE_SHIFT


def reg_size(reg_id: int) -> int:
    """Bytes of the register reg_id names (KVM_REG_SIZE(id)): the ONE_REG id
    encodes it the same way on every arch."""
    return 1 << ((reg_id & abi.KVM_REG_SIZE_MASK) >> abi.KVM_REG_SIZE_SHIFT)


def _thread_name(ident: int | None) -> str:
    for t in threading.enumerate():
        if t.ident == ident:
            return repr(t.name)
    return f"thread {ident}"


class Vcpu(DeviceAttributes):
    """One virtual CPU. run() enters the guest and returns the decoded exit.

    run() releases the GIL while the guest runs; kick() from any thread makes a
    running (or the next) run() return an InterruptedExit promptly. One thread at a
    time may run a vCPU. An exit is valid until the vCPU's next run() (see exits.py).
    """

    def __init__(self, vm: Vm, fd: int, vcpu_id: int, page: mmap.mmap) -> None:
        super().__init__(fd)
        self.vm = vm
        self.id = vcpu_id
        self._page = page
        # The run gate: one token, taken by run() (or an answer to an exit) and put back
        # after; taken by close() for good. Taking (del gate[0]) and append() are atomic.
        self._gate: list[None] = [None]
        self._runner: int | None = None     # the thread holding the gate (in run(): kick() signals it)
        self._pending: Exit | None = None   # the exit the next run() answers; None: nothing to answer
        # Set as this vCPU or its VM starts closing, before either kicks it: run() checks this
        # one flag before and after KVM_RUN.
        self._halted = False
        self._page_size = len(page)
        self._mmio_first = False            # which member run() unpacks with exit_reason
        # The exit objects run() handed out last and the one before (see _refcount).
        self._io_last: IoExit = _NOBODYS
        self._io_spare: IoExit = _NOBODYS
        self._mmio_last: MmioExit = _NOBODYS
        self._mmio_spare: MmioExit = _NOBODYS
        self._close_deadline: float | None = None   # set by a VM closing several vCPUs
        self._deferred = False              # close() left the teardown to run()
        self._ring: mmap.mmap | None = None
        self._ring_next = 0
        self._ring_lock = threading.Lock()
        self._setup: dict[object, tuple[str, dict[str, Any]]] = {}   # replayed by a restore
        self._decoder = _Decoder(self, page)
        self._kvm_run = abi.kvm_run.from_buffer(page)
        _install_kick_handler()

    @classmethod
    def from_fd(cls: type[_C], vm: Vm, fd: int, vcpu_id: int | None = None) -> _C:
        """A Vcpu of vm for an open "kvm-vcpu" fd of that VM (KVM_CREATE_VCPU elsewhere in
        this process), with its kvm_run page mapped from fd; of vm's arch Vcpu class.

        vcpu_id: read from the fd's name where the kernel puts it there, else required.
        From then on the Vcpu owns fd and closes it with itself or its VM: dup() it first
        to keep one of yours. If fd is not a vCPU fd, the id is taken by an open Vcpu, the
        VM is closed or the mapping fails, it raises and fd stays yours, open. That fd
        belongs to vm is the caller's word: the kernel cannot be asked.
        """
        from .vm import Vm
        if not isinstance(vm, Vm):
            raise TypeError(f"Vcpu.from_fd() takes the Vm the vCPU belongs to, not "
                            f"{type(vm).__name__}")
        if not issubclass(vm._vcpu_class, cls):       # before fd is taken
            raise TypeError(f"{vm!r} makes {vm._vcpu_class.__name__} vCPUs, not {cls.__name__}")
        return cast(_C, vm._adopt_vcpu_fd(fd, vcpu_id))

    @property
    def kvm_run(self) -> abi.kvm_run:
        """The shared struct kvm_run, as a ctypes view of the mapped page."""
        if self._closing:
            raise self._stale()
        return self._kvm_run

    # -- running
    def run(self) -> Exit:
        """One KVM_RUN. EINTR (a signal, kick(), immediate_exit) is an InterruptedExit.

        The answer to the previous exit (data written into an IN or MMIO-read exit) is
        delivered first. VcpuBusyError if another thread is running this vCPU;
        StaleHandleError if the vCPU or its VM is (or gets) closed.
        """
        # The hot path: every step here is paid on each exit, so it does only what the
        # guarantees need, in this one frame: IO and MMIO exits are decoded here, one unpack
        # each (the decoder does the rest); the run gate is a one-token list.
        # The gate is taken by `del gate[0]`, and nothing between it and the try below is a
        # point where CPython runs a signal handler (it does so only after calls and backward
        # jumps); the finally gives it back with its first call. So a handler's exception
        # (Ctrl-C, a timeout) cannot leave the gate taken by nobody: the vCPU would be busy
        # for good. tests/test_run_attack.py fires SIGALRM every 30 µs at this.
        gate = self._gate
        try:
            del gate[0]
        except IndexError:
            raise self._busy() from None
        try:
            self._runner = _get_ident()
            # Holding the gate is this call's hold on the fd: close() closes it only once it
            # has taken the gate, or, giving up waiting, leaves that to us (see _defer). A
            # closed vCPU's gate is never free; one closing now (_halted) kicks this run, or
            # stopped it already with immediate_exit, which stays set once it is closing: either
            # way this run ends in the check after KVM_RUN.
            if self._pending is not None:
                self._retire(deliver=True)
            try:
                _run_ioctl(self._fd, _KVM_RUN)
            except OSError as err:
                if self._halted:
                    raise self._closed_while_running() from None
                if err.errno != errno.EINTR:
                    raise KvmError("KVM_RUN", err.errno or errno.EIO) from None
                # The kick (if any) is consumed; a later one sets immediate_exit again.
                self._page[_IMMEDIATE_EXIT] = 0
                i = _InterruptedExit()
                i.reason = _INTR
                return i
            if self._halted:
                raise self._closed_while_running()
            page = self._page
            # One unpack of exit_reason and the member it guesses (the last IO or MMIO exit's);
            # a second one when the guess was wrong.
            if self._mmio_first:
                reason, phys_addr, length, is_write = _unpack_reason_mmio(page)
                if reason == _IO:
                    self._mmio_first = False
                    reason, direction, size, port, count, start = _unpack_reason_io(page)
            else:
                reason, direction, size, port, count, start = _unpack_reason_io(page)
                if reason == _MMIO:
                    self._mmio_first = True
                    reason, phys_addr, length, is_write = _unpack_reason_mmio(page)
            if reason == _IO:
                e = self._io_spare
                if _refcount(e) != _UNSHARED:
                    e = _IoExit()
                    e.reason = _IO_REASON
                self._io_spare = self._io_last
                self._io_last = e
                e.port = port
                e.size = size
                e.count = count
                end = start + size * count      # both unsigned: only the end can be out of range
                if end > self._page_size:
                    raise self._decoder.outside(start, end)
                if direction == _IO_OUT:
                    e.is_write = True
                    e.data = page[start:end]
                else:
                    e.is_write = False
                    self._decoder.answer_buffer(e, start, end)
                return e
            if reason == _MMIO:
                m = self._mmio_spare
                if _refcount(m) != _UNSHARED:
                    m = _MmioExit()
                    m.reason = _MMIO_REASON
                self._mmio_spare = self._mmio_last
                self._mmio_last = m
                m.phys_addr = phys_addr
                end = _MMIO_DATA_OFF + (length if length < _MMIO_DATA_MAX else _MMIO_DATA_MAX)
                if is_write:
                    m.is_write = True
                    m.data = page[_MMIO_DATA_OFF:end]
                else:
                    m.is_write = False
                    self._decoder.answer_buffer(m, _MMIO_DATA_OFF, end)
                return m
            return self._decoder.decode(reason)
        except BaseException:
            # Whatever leaves run() this way (KeyboardInterrupt from a signal that also
            # interrupted KVM_RUN, a closed vCPU...) takes a pending kick with it, so the
            # next run() enters the guest; but for a vCPU being closed, which no run() should
            # enter again. (Holding the gate, the page is ours.)
            if not self._halted:
                self._page[_IMMEDIATE_EXIT] = 0
            raise
        finally:
            self._runner = None
            gate.append(None)
            if self._deferred:          # close() gave up waiting: the teardown is ours
                self._finish_close()

    def _retire(self, deliver: bool) -> None:
        """Holding the gate: the pending exit's answer goes to the page (deliver) or nowhere,
        and that exit can no longer be answered."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._decoder.retire(pending, deliver)

    def _closed_while_running(self) -> StaleHandleError:
        what = f"vCPU {self.id}" if self._closing else "its VM"
        return StaleHandleError(f"{what} was closed while vCPU {self.id} ran")

    def _take_gate(self) -> bool:
        """Take the run gate if it is free (the one token: run(), an answer, or close() has it)."""
        try:
            del self._gate[0]
        except IndexError:
            return False
        return True

    @contextlib.contextmanager
    def _holding_gate(self, refuse: Callable[[], Exception]) -> Iterator[None]:
        """Hold the run gate for a moment: no run() starts meanwhile. If it is taken (a
        run() going on, or close()), raise what refuse() makes."""
        gate = self._gate
        try:
            del gate[0]                 # as in run(): nothing interruptible up to the try
        except IndexError:
            raise refuse() from None
        try:
            self._runner = threading.get_ident()
            yield
        finally:
            self._runner = None
            gate.append(None)
            if self._deferred:
                self._finish_close()

    def _between_runs(self, what: str) -> contextlib.AbstractContextManager[None]:
        """The gate while an exit is answered: one that is running means the answer is too
        late."""
        return self._holding_gate(lambda: StaleExitError(
            f"{what} while vCPU {self.id} is running again (or closed): the guest has moved on"))

    def _busy(self) -> Exception:
        if self._closing:
            return self._stale()
        owner = self._runner
        if owner == threading.get_ident():
            return VcpuBusyError(f"vCPU {self.id} is already running in this thread "
                                 f"(run() called from inside run(), e.g. from a signal handler)")
        return VcpuBusyError(f"vCPU {self.id} is running in {_thread_name(owner)}: one thread "
                             f"at a time runs a vCPU (kick() it to make that run() return)")

    def _live_page(self) -> mmap.mmap:
        """The kvm_run page, or StaleHandleError once close() has unmapped it."""
        page = self._page
        if self._closing or page.closed:
            raise self._stale()
        return page

    @property
    def immediate_exit(self) -> bool:
        """kvm_run.immediate_exit: when set, KVM_RUN returns EINTR without entering the guest."""
        try:
            return bool(self._live_page()[_IMMEDIATE_EXIT])
        except ValueError as e:            # unmapped between the check and the read
            raise self._stale() from e

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        try:
            self._live_page()[_IMMEDIATE_EXIT] = int(bool(value))
        except ValueError as e:
            raise self._stale() from e

    def kick(self) -> None:
        """Make run() return promptly, from any thread: the running one, or else the next.

        immediate_exit is set before the signal is sent, so a kick that lands just
        before KVM_RUN is entered still stops it (the race KVM documents). A kick that
        fails leaves immediate_exit as it was.
        """
        thread = self._runner
        if thread is not None and thread != threading.get_ident() and not _install_kick_handler():
            raise RuntimeError("kick() needs a handler for the kick signal, and signal handlers "
                               "can only be installed from the main thread: create the first "
                               "Vcpu there, or install a handler for vcpu.KICK_SIGNAL")
        self.immediate_exit = True
        try:
            self._signal_runner()
        except BaseException:
            self.immediate_exit = False
            raise

    def _stop(self) -> None:
        """Kick a running vCPU without waiting: the VM stops all of them before closing each."""
        page = self._page                   # (close() uses this: not _live_page())
        try:
            if self._runner is not None:
                page[_IMMEDIATE_EXIT] = 1
        except ValueError:
            return                          # torn down already: nothing runs
        self._signal_runner()

    def _signal_runner(self) -> None:
        """Interrupt KVM_RUN in the thread running it, if that is another thread."""
        thread = self._runner
        # Without a handler the kick signal would kill the process: immediate_exit alone then.
        if thread is not None and thread != threading.get_ident() and _install_kick_handler():
            try:
                signal.pthread_kill(thread, KICK_SIGNAL)
            except ProcessLookupError:
                pass    # the thread has left run() already; immediate_exit covers the next one

    def _run_member(self, reason: int) -> Any:
        return self._decoder.live_member(reason)

    # -- state every arch has
    def get_mp_state(self) -> abi.MpState:
        """KVM_GET_MP_STATE as an abi.MpState (KVM_CAP_MP_STATE)."""
        self.vm.require(abi.Capability.MP_STATE, "KVM_GET_MP_STATE")
        return abi.MpState(self._get(abi.KVM_GET_MP_STATE, abi.kvm_mp_state).mp_state)

    def set_mp_state(self, state: int) -> None:
        """KVM_SET_MP_STATE (KVM_CAP_MP_STATE): an abi.MpState value."""
        self.vm.require(abi.Capability.MP_STATE, "KVM_SET_MP_STATE")
        self.ioctl(abi.KVM_SET_MP_STATE, fill(abi.kvm_mp_state, {"mp_state": "state"}, mp_state=state))

    def set_guest_debug(self, control: int) -> None:
        """KVM_SET_GUEST_DEBUG (KVM_CAP_SET_GUEST_DEBUG): control is abi.GuestDebugFlag bits;
        the arch classes add their breakpoint registers."""
        self.vm.require(abi.Capability.SET_GUEST_DEBUG, "KVM_SET_GUEST_DEBUG")
        self.ioctl(abi.KVM_SET_GUEST_DEBUG, fill(abi.kvm_guest_debug, control=control))

    def set_single_step(self, enabled: bool = True) -> None:
        """Exit with KVM_EXIT_DEBUG after every guest instruction (or stop doing so)."""
        flags = abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_SINGLESTEP if enabled else 0
        self.set_guest_debug(flags)

    # -- ONE_REG and the signal mask
    def _one_reg(self, reg_id: int) -> tuple[int, Any]:
        """reg_id checked, and a buffer of the size the id encodes: KVM writes that many bytes."""
        reg_id = check_field(reg_id, abi.kvm_one_reg, "id", "reg_id")
        return reg_id, (ctypes.c_uint8 * reg_size(reg_id))()

    def get_one_reg(self, reg_id: int) -> int:
        """KVM_GET_ONE_REG (KVM_CAP_ONE_REG): the register as an unsigned int of the width
        its id encodes (8 to 2048 bits)."""
        self.vm.require(abi.Capability.ONE_REG, "KVM_GET_ONE_REG")
        reg_id, buf = self._one_reg(reg_id)
        self.ioctl(abi.KVM_GET_ONE_REG, abi.kvm_one_reg(id=reg_id, addr=ctypes.addressof(buf)))
        return int.from_bytes(bytes(buf), "little")

    def set_one_reg(self, reg_id: int, value: int) -> None:
        self.vm.require(abi.Capability.ONE_REG, "KVM_SET_ONE_REG")
        reg_id, buf = self._one_reg(reg_id)
        width = len(buf) * 8
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"value must be an integer, not {type(value).__name__}")
        if not 0 <= value < 1 << width:
            raise OverflowError(f"value={value:#x} does not fit register {reg_id:#x}, which is "
                                f"{width} bits wide (KVM_REG_SIZE in its id)")
        buf[:] = value.to_bytes(len(buf), "little")
        self.ioctl(abi.KVM_SET_ONE_REG, abi.kvm_one_reg(id=reg_id, addr=ctypes.addressof(buf)))

    def get_reg_list(self) -> list[int]:
        """KVM_GET_REG_LIST: every ONE_REG id this vCPU has (E2BIG tells the count)."""
        probe = abi.kvm_reg_list.alloc(0)
        try:
            self.ioctl(abi.KVM_GET_REG_LIST, probe)
        except KvmError as e:
            if e.errno != errno.E2BIG:
                raise
        regs = abi.kvm_reg_list.alloc(probe.n)
        self.ioctl(abi.KVM_GET_REG_LIST, regs)
        return [int(r) for r in regs.flex_array()]

    def get_registers(self) -> dict[int, int]:
        """Every register KVM_GET_REG_LIST names -> {ONE_REG id: value}, each read with
        KVM_GET_ONE_REG at the size its id encodes: the vCPU's state as ONE_REG sees it
        (on arm64 after vcpu_init(), and finalize() for SVE)."""
        return {reg: self.get_one_reg(reg) for reg in self.get_reg_list()}

    def set_registers(self, values: Mapping[int, int]) -> None:
        """KVM_SET_ONE_REG for each {ONE_REG id: value}, in order (what get_registers()
        returned restores the state); a refusal names the register."""
        if not isinstance(values, Mapping):
            raise TypeError(f"set_registers() takes a mapping of register id to value, not "
                            f"{type(values).__name__}")
        for reg, value in values.items():
            try:
                self.set_one_reg(reg, value)
            except KvmError as e:
                raise KvmError("KVM_SET_ONE_REG", e.errno or 0, f"register {reg:#x}") from None

    def set_signal_mask(self, signals: Iterable[int] | None) -> None:
        """KVM_SET_SIGNAL_MASK: signals blocked while the guest runs (None: use the thread's).
        KICK_SIGNAL cannot be blocked: kick() and close() depend on it."""
        if signals is None:
            self.ioctl(abi.KVM_SET_SIGNAL_MASK, None)
            return
        nbytes = 8   # the kernel's sigset_t: 64 signals
        mask = 0
        for s in signals:
            s = check_int(s, ctypes.c_int, "signal")
            if not 1 <= s <= nbytes * 8:
                raise ValueError(f"signal {s} is not a signal number (1..{nbytes * 8})")
            if s == KICK_SIGNAL:
                raise ValueError(f"signal {s} is the kick signal: blocked in KVM_RUN, kick() and "
                                 f"close() could not stop this vCPU")
            mask |= 1 << (s - 1)
        sm = abi.kvm_signal_mask.alloc(nbytes)
        sm.flex_array()[:] = list(mask.to_bytes(nbytes, "little"))
        self.ioctl(abi.KVM_SET_SIGNAL_MASK, sm)

    def harvest_dirty_ring(self) -> list[tuple[int, int]]:
        """Harvest this vCPU's dirty ring: [(slot, page offset in the slot), ...] in order.

        Each harvested entry is marked for reset; vm.reset_dirty_rings() then re-arms them.
        """
        entries = self.vm.dirty_ring_entries
        if not entries:
            raise ValueError("the dirty ring is off; call vm.enable_dirty_ring() before "
                             "creating vCPUs")
        with self._ring_lock:
            if self._ring is None:
                self._hold()             # the fd stays open (and is this vCPU's) while mapping
                try:
                    ring_map = mmap.mmap(self._fd, entries * ctypes.sizeof(abi.kvm_dirty_gfn),
                                         mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                         offset=abi.KVM_DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE)
                finally:
                    self._unhold()
                with self._lock:         # published before close() looks, or refused after
                    if self._closing:
                        ring_map.close()
                        raise self._stale()
                    self._ring = ring_map
            try:
                out, self._ring_next = _harvest_ring(self._ring, self._ring_next, entries)
            except ValueError:
                raise self._stale() from None          # unmapped by close() meanwhile
        return out

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on this vCPU with up to four arguments; KvmUnsupported naming cap if
        this kernel does not report it (KVM_CHECK_EXTENSION says 0)."""
        self.vm.require(abi.Capability.ENABLE_CAP, "KVM_ENABLE_CAP on a vCPU")
        req = _requests.enable_cap(cap, args, flags)
        self.vm.require(req.cap, "KVM_ENABLE_CAP")
        self.ioctl(abi.KVM_ENABLE_CAP, req)
        self._setup.pop(int(req.cap), None)
        self._setup[int(req.cap)] = ("enable_cap", {"cap": int(req.cap), "flags": flags,
                                                    "args": [int(a) for a in req.args[:len(args)]]})

    def _stopped(self) -> contextlib.AbstractContextManager[None]:
        """The gate while state is read or written: VcpuBusyError if another thread is
        running this vCPU (the kernel would block the ioctls until its KVM_RUN ends)."""
        return self._holding_gate(self._busy)

    def open_stats(self) -> Stats:
        """The vCPU's binary statistics fd (KVM_GET_STATS_FD); closed with the vCPU."""
        self.vm.require(abi.Capability.BINARY_STATS_FD, "KVM_GET_STATS_FD")
        stats = Stats(self.ioctl(abi.KVM_GET_STATS_FD))
        self._adopt(stats)
        return stats

    # -- coalesced MMIO ring, shared through this vCPU's mapping
    def drain_coalesced_mmio(self) -> list[tuple[int, bytes, bool]]:
        """Drain the coalesced MMIO/PIO ring: [(address, data, is_pio), ...] oldest first."""
        self.fd  # noqa: B018 - refuse a closed vCPU before touching its page
        page = self.vm.require(abi.Capability.COALESCED_MMIO, "coalesced MMIO")
        entry_size = ctypes.sizeof(abi.kvm_coalesced_mmio)
        # The ring fills the rest of its page (KVM_COALESCED_MMIO_MAX, which needs PAGE_SIZE).
        slots = (mmap.PAGESIZE - ctypes.sizeof(abi.kvm_coalesced_mmio_ring)) // entry_size
        try:
            # While these views exist close() cannot unmap the page under them.
            ring = abi.kvm_coalesced_mmio_ring.from_buffer(self._page, page * mmap.PAGESIZE)
            entries = (abi.kvm_coalesced_mmio * slots).from_buffer(
                self._page,
                page * mmap.PAGESIZE + member(abi.kvm_coalesced_mmio_ring, "coalesced_mmio")[0])
        except ValueError:
            raise self._stale() from None              # unmapped by close() meanwhile
        out = []
        first = ring.first
        while first != ring.last:
            e = entries[first]
            out.append((int(e.phys_addr), bytes(e.data[:e.len]), bool(e.pio)))
            first = (first + 1) % slots
            ring.first = first
        del ring, entries
        return out

    # -- lifetime
    def _release(self) -> BaseException | None:
        self._halted = True
        pending: BaseException | None = None
        try:
            if self._stop_running():
                self._teardown()
        except BaseException as e:      # interrupted while waiting: run() finishes the close
            pending = e
        try:
            self._close_children()
        except BaseException as e:
            pending = pending or e
        return pending

    def _stop_running(self) -> bool:
        """Take the run gate from a running run(): kick it and wait, up to the deadline.
        False: it did not stop (or cannot, being this thread), and tears down itself; or this
        is a close() finishing an interrupted one, and the teardown is done already."""
        if self._page is _GONE:
            return False
        if self._take_gate():
            return True
        if self._runner in (None, threading.get_ident()):
            # close() from a signal handler inside run() (or run() between taking the gate
            # and naming its thread, where it refuses a closing vCPU anyway): waiting would
            # wait for ourselves. immediate_exit stops a KVM_RUN about to be entered, and
            # run() finishes the close on its way out.
            self._page[_IMMEDIATE_EXIT] = 1
            return self._defer(warn=False)
        deadline = self._close_deadline or time.monotonic() + CLOSE_TIMEOUT
        pause = 0.0005
        try:
            while not self._take_gate():
                self._stop()            # again each round: a kick can land between two runs
                if time.monotonic() > deadline:
                    return self._defer(warn=True)
                time.sleep(pause)       # a kicked run() is back within microseconds
                pause = min(pause * 2, 0.01)
        except BaseException:
            # Interrupted while waiting (Ctrl-C): run() finishes the close, unless it has
            # returned meanwhile, and then it is finished here.
            if self._defer(warn=False):
                self._teardown()
            raise
        return True

    def _defer(self, warn: bool) -> bool:
        """run() has not returned: it tears down when it does, and holds the fd until then,
        counted from here as a call in flight (so whoever is last closes it, see _unhold).
        True if it returned just now after all."""
        with self._lock:
            if not self._deferred:
                self._deferred = True
                self._users += 1
        if self._take_gate():
            self._undefer()
            return True
        if warn:
            warnings.warn(f"vCPU {self.id} did not leave KVM_RUN within {CLOSE_TIMEOUT} s of "
                          f"being kicked (is the kick signal blocked in its thread?); it is "
                          f"closed when that run() returns", RuntimeWarning, stacklevel=5)
        return False

    def _finish_close(self) -> None:
        """In run(), after close() deferred to it: tear down, once."""
        if self._take_gate():
            if self._deferred:
                try:
                    self._teardown()
                finally:
                    self._undefer()
            else:
                self._gate.append(None)

    def _undefer(self) -> None:
        """Holding the run gate: the run() close() deferred to is over; drop its hold on the
        fd (closing it if close() is done), in one step an interruption cannot split."""
        with self._lock:
            if self._deferred:
                self._deferred = False
                self._users -= 1
                if self._closed and self._users == 0:
                    self._close_fd()

    def _teardown(self) -> None:
        """Unmap the kvm_run page and rings; called holding the run gate, kept for good.
        The pending exit's answer goes nowhere: it raises StaleExitError from here on.

        A view the caller still holds (vcpu.kvm_run kept in a variable) keeps its mapping
        until it goes: the references here are dropped either way, so the mapping and the
        fd Python's mmap duplicated go with the last view.
        """
        self._retire(deliver=False)
        self._decoder.release()
        with self._ring_lock, self._lock:
            maps = [m for m in (self._ring, self._page) if m is not None]
            self._ring, self._page = None, _GONE
        del self._kvm_run
        for m in maps:
            try:
                m.close()
            except BufferError:
                pass

    def __repr__(self) -> str:
        if getattr(self, "_closing", True):
            return f"<Vcpu {getattr(self, 'id', '?')} closed>"
        return f"<Vcpu {self.id} fd={self._fd}>"
