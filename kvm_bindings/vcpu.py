"""Vcpu: a "kvm-vcpu" fd (kvm_vcpu_ioctl) and its shared kvm_run page."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from . import abi
from ._fd import _ioctl
from ._layout import member, offset_of
from .device import DeviceAttributes
from .errors import KvmError, KvmUnsupported
from .exits import Decoder, Exit, InterruptedExit

if TYPE_CHECKING:
    from .stats import Stats
    from .vm import Vm

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


_EXIT_REASON = offset_of(abi.kvm_run, "exit_reason")
_IMMEDIATE_EXIT = offset_of(abi.kvm_run, "immediate_exit")
_KVM_RUN = abi.KVM_RUN


class Vcpu(DeviceAttributes):
    """One virtual CPU. run() enters the guest and returns the decoded exit.

    run() releases the GIL while the guest runs; kick() from any thread makes a
    running (or the next) run() return an InterruptedExit promptly.
    """

    def __init__(self, vm: Vm, fd: int, vcpu_id: int) -> None:
        super().__init__(fd)
        self.vm = vm
        self.id = vcpu_id
        self._thread: int | None = None
        self._ring: mmap.mmap | None = None
        self._ring_next = 0
        try:
            self._page = mmap.mmap(fd, vm.vcpu_mmap_size, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            self._closed = True
            os.close(fd)
            raise
        self._decoder = Decoder(self, self._page)
        self.kvm_run = abi.kvm_run.from_buffer(self._page)
        _install_kick_handler()

    # -- running
    def run(self) -> Exit:
        """One KVM_RUN. EINTR (a signal, kick(), immediate_exit) is an InterruptedExit."""
        fd = self.fd
        self._thread = threading.get_ident()
        try:
            ret = _ioctl(fd, _KVM_RUN, None)
        finally:
            self._thread = None
        if ret < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                # The kick (if any) is consumed; a later one sets immediate_exit again.
                self._page[_IMMEDIATE_EXIT] = 0
                e = InterruptedExit.__new__(InterruptedExit)
                e.reason = abi.ExitReason.INTR
                return e
            raise KvmError("KVM_RUN", err)
        dec = self._decoder
        return dec.decode(dec.reason())

    @property
    def immediate_exit(self) -> bool:
        """kvm_run.immediate_exit: when set, KVM_RUN returns EINTR without entering the guest."""
        return bool(self._page[_IMMEDIATE_EXIT])

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self._page[_IMMEDIATE_EXIT] = int(bool(value))

    def kick(self) -> None:
        """Make run() return promptly, from any thread: the running one, or else the next.

        immediate_exit is set before the signal is sent, so a kick that lands just
        before KVM_RUN is entered still stops it (the race KVM documents).
        """
        if self.closed:
            raise ValueError("I/O operation on closed Vcpu")
        self._page[_IMMEDIATE_EXIT] = 1
        thread = self._thread
        if thread is not None and thread != threading.get_ident():
            if not _install_kick_handler():
                raise RuntimeError("kick() needs a handler for the kick signal, and signal handlers "
                                   "can only be installed from the main thread: create the first "
                                   "Vcpu there, or install a handler for vcpu.KICK_SIGNAL")
            try:
                signal.pthread_kill(thread, KICK_SIGNAL)
            except ProcessLookupError:
                pass    # the thread has left run() already; immediate_exit covers the next one

    def _run_member(self, reason: int) -> Any:
        return self._decoder.live_member(reason)

    # -- plain get/set pairs
    def get_regs(self) -> Any:
        """KVM_GET_REGS -> kvm_regs."""
        return self._get(abi.KVM_GET_REGS, abi.kvm_regs)

    def set_regs(self, regs: Any) -> None:
        self.ioctl(abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> Any:
        """KVM_GET_SREGS -> kvm_sregs."""
        return self._get(abi.KVM_GET_SREGS, abi.kvm_sregs)

    def set_sregs(self, sregs: Any) -> None:
        self.ioctl(abi.KVM_SET_SREGS, sregs)

    def get_sregs2(self) -> Any:
        """KVM_GET_SREGS2 -> kvm_sregs2 (KVM_CAP_SREGS2): sregs plus the PDPTRs."""
        self.vm.require(abi.Capability.SREGS2, "KVM_GET_SREGS2")
        return self._get(abi.KVM_GET_SREGS2, abi.kvm_sregs2)

    def set_sregs2(self, sregs2: Any) -> None:
        self.vm.require(abi.Capability.SREGS2, "KVM_SET_SREGS2")
        self.ioctl(abi.KVM_SET_SREGS2, sregs2)

    def get_fpu(self) -> Any:
        """KVM_GET_FPU -> kvm_fpu."""
        return self._get(abi.KVM_GET_FPU, abi.kvm_fpu)

    def set_fpu(self, fpu: Any) -> None:
        self.ioctl(abi.KVM_SET_FPU, fpu)

    def get_xsave(self) -> Any:
        """KVM_GET_XSAVE -> kvm_xsave (the legacy 4 KiB area; see get_xsave2)."""
        self.vm.require(abi.Capability.XSAVE, "KVM_GET_XSAVE")
        return self._get(abi.KVM_GET_XSAVE, abi.kvm_xsave)

    def set_xsave(self, xsave: Any) -> None:
        self.vm.require(abi.Capability.XSAVE, "KVM_SET_XSAVE")
        self.ioctl(abi.KVM_SET_XSAVE, xsave)

    def get_xsave2(self) -> Any:
        """KVM_GET_XSAVE2 -> kvm_xsave sized by KVM_CAP_XSAVE2 (AMX and other large state)."""
        size = self.vm.require(abi.Capability.XSAVE2, "KVM_GET_XSAVE2")
        extra = max(0, size - ctypes.sizeof(abi.kvm_xsave)) // ctypes.sizeof(ctypes.c_uint32)
        xsave = abi.kvm_xsave.alloc(extra)
        self.ioctl(abi.KVM_GET_XSAVE2, xsave)
        return xsave

    def get_xcrs(self) -> Any:
        """KVM_GET_XCRS -> kvm_xcrs (KVM_CAP_XCRS)."""
        self.vm.require(abi.Capability.XCRS, "KVM_GET_XCRS")
        return self._get(abi.KVM_GET_XCRS, abi.kvm_xcrs)

    def set_xcrs(self, xcrs: Any) -> None:
        self.vm.require(abi.Capability.XCRS, "KVM_SET_XCRS")
        self.ioctl(abi.KVM_SET_XCRS, xcrs)

    def get_lapic(self) -> Any:
        """KVM_GET_LAPIC -> kvm_lapic_state (needs the in-kernel irqchip)."""
        return self._get(abi.KVM_GET_LAPIC, abi.kvm_lapic_state)

    def set_lapic(self, lapic: Any) -> None:
        self.ioctl(abi.KVM_SET_LAPIC, lapic)

    def get_mp_state(self) -> Any:
        """KVM_GET_MP_STATE as an abi.MpState."""
        self.vm.require(abi.Capability.MP_STATE, "KVM_GET_MP_STATE")
        return abi.MpState(self._get(abi.KVM_GET_MP_STATE, abi.kvm_mp_state).mp_state)

    def set_mp_state(self, state: int) -> None:
        self.vm.require(abi.Capability.MP_STATE, "KVM_SET_MP_STATE")
        self.ioctl(abi.KVM_SET_MP_STATE, abi.kvm_mp_state(mp_state=int(state)))

    def get_vcpu_events(self) -> Any:
        """KVM_GET_VCPU_EVENTS -> kvm_vcpu_events (KVM_CAP_VCPU_EVENTS)."""
        self.vm.require(abi.Capability.VCPU_EVENTS, "KVM_GET_VCPU_EVENTS")
        return self._get(abi.KVM_GET_VCPU_EVENTS, abi.kvm_vcpu_events)

    def set_vcpu_events(self, events: Any) -> None:
        self.vm.require(abi.Capability.VCPU_EVENTS, "KVM_SET_VCPU_EVENTS")
        self.ioctl(abi.KVM_SET_VCPU_EVENTS, events)

    def get_debugregs(self) -> Any:
        """KVM_GET_DEBUGREGS -> kvm_debugregs (KVM_CAP_DEBUGREGS)."""
        self.vm.require(abi.Capability.DEBUGREGS, "KVM_GET_DEBUGREGS")
        return self._get(abi.KVM_GET_DEBUGREGS, abi.kvm_debugregs)

    def set_debugregs(self, debugregs: Any) -> None:
        self.vm.require(abi.Capability.DEBUGREGS, "KVM_SET_DEBUGREGS")
        self.ioctl(abi.KVM_SET_DEBUGREGS, debugregs)

    def set_guest_debug(self, control: int, debugreg: Iterable[int] = ()) -> None:
        """KVM_SET_GUEST_DEBUG: control is GuestDebugFlag bits; debugreg fills arch.debugreg."""
        self.vm.require(abi.Capability.SET_GUEST_DEBUG, "KVM_SET_GUEST_DEBUG")
        dbg = abi.kvm_guest_debug(control=int(control))
        for i, value in enumerate(debugreg):
            dbg.arch.debugreg[i] = value
        self.ioctl(abi.KVM_SET_GUEST_DEBUG, dbg)

    def single_step(self, enabled: bool = True) -> None:
        """Exit with KVM_EXIT_DEBUG after every guest instruction (or stop doing so)."""
        flags = abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_SINGLESTEP if enabled else 0
        self.set_guest_debug(flags)

    # -- MSRs and CPUID
    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS for these MSR indices -> {index: value} (only those KVM returned)."""
        indices = list(indices)
        msrs = abi.kvm_msrs.alloc(len(indices))
        for entry, index in zip(msrs.flex_array(), indices):
            entry.index = index
        done = self.ioctl(abi.KVM_GET_MSRS, msrs)
        return {int(e.index): int(e.data) for e in msrs.flex_array()[:done]}

    def set_msrs(self, values: dict[int, int]) -> int:
        """KVM_SET_MSRS; raises KvmError naming the first MSR KVM refused."""
        msrs = abi.kvm_msrs.alloc(len(values))
        for entry, (index, value) in zip(msrs.flex_array(), values.items()):
            entry.index, entry.data = index, value
        done = self.ioctl(abi.KVM_SET_MSRS, msrs)
        if done != len(values):
            index = list(values)[done]
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {index:#x} was refused")
        return done

    def set_cpuid2(self, cpuid: Any) -> None:
        """KVM_SET_CPUID2 with a kvm_cpuid2 (e.g. kvm.supported_cpuid())."""
        self.ioctl(abi.KVM_SET_CPUID2, cpuid)

    def get_cpuid2(self, max_entries: int = 256) -> Any:
        """KVM_GET_CPUID2: what was set, as a kvm_cpuid2."""
        cpuid = abi.kvm_cpuid2.alloc(max_entries)
        self.ioctl(abi.KVM_GET_CPUID2, cpuid)
        return cpuid

    # -- ONE_REG, sync regs, signal mask, TSC
    def get_one_reg(self, reg_id: int) -> int:
        """KVM_GET_ONE_REG for a register of up to 64 bits (KVM_CAP_ONE_REG)."""
        self.vm.require(abi.Capability.ONE_REG, "KVM_GET_ONE_REG")
        value = ctypes.c_uint64()
        self.ioctl(abi.KVM_GET_ONE_REG, abi.kvm_one_reg(id=reg_id, addr=ctypes.addressof(value)))
        return value.value

    def set_one_reg(self, reg_id: int, value: int) -> None:
        self.vm.require(abi.Capability.ONE_REG, "KVM_SET_ONE_REG")
        buf = ctypes.c_uint64(value)
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

    def sync_regs(self, valid: int) -> None:
        """Ask KVM to copy these register sets (abi.SyncRegs bits) into kvm_run.s on every exit
        (KVM_CAP_SYNC_REGS); read and change them in vcpu.kvm_run.s.regs, then mark_dirty()."""
        supported = self.vm.require(abi.Capability.SYNC_REGS, "kvm_run sync regs")
        if valid & ~supported:
            raise KvmUnsupported(f"sync regs {valid:#x}", "KVM_CAP_SYNC_REGS (those register sets)")
        self.kvm_run.kvm_valid_regs = valid

    def mark_dirty(self, regs: int) -> None:
        """Tell KVM to load these sync register sets from kvm_run.s on the next run."""
        self.kvm_run.kvm_dirty_regs = regs

    def set_signal_mask(self, signals: Iterable[int] | None) -> None:
        """KVM_SET_SIGNAL_MASK: signals blocked while the guest runs (None: use the thread's)."""
        if signals is None:
            self.ioctl(abi.KVM_SET_SIGNAL_MASK, None)
            return
        nbytes = 8   # the kernel's sigset_t: 64 signals
        mask = 0
        for s in signals:
            mask |= 1 << (int(s) - 1)
        sm = abi.kvm_signal_mask.alloc(nbytes)
        sm.flex_array()[:] = list(mask.to_bytes(nbytes, "little"))
        self.ioctl(abi.KVM_SET_SIGNAL_MASK, sm)

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ (KVM_CAP_GET_TSC_KHZ)."""
        self.vm.require(abi.Capability.GET_TSC_KHZ, "KVM_GET_TSC_KHZ")
        return self.ioctl(abi.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ (KVM_CAP_TSC_CONTROL)."""
        self.vm.require(abi.Capability.TSC_CONTROL, "KVM_SET_TSC_KHZ")
        self.ioctl(abi.KVM_SET_TSC_KHZ, khz)

    def translate(self, linear_address: int) -> Any:
        """KVM_TRANSLATE: walk the guest's page tables -> kvm_translation."""
        return self._get(abi.KVM_TRANSLATE, abi.kvm_translation, linear_address=linear_address)

    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT: queue an external interrupt (only without the in-kernel irqchip)."""
        self.ioctl(abi.KVM_INTERRUPT, abi.kvm_interrupt(irq=vector))

    def nmi(self) -> None:
        """KVM_NMI: inject a non-maskable interrupt."""
        self.ioctl(abi.KVM_NMI)

    def smi(self) -> None:
        """KVM_SMI: inject a system management interrupt (KVM_CAP_X86_SMM)."""
        self.vm.require(abi.Capability.X86_SMM, "KVM_SMI")
        self.ioctl(abi.KVM_SMI)

    def get_nested_state(self) -> Any:
        """KVM_GET_NESTED_STATE -> kvm_nested_state with its data (KVM_CAP_NESTED_STATE)."""
        size = self.vm.require(abi.Capability.NESTED_STATE, "KVM_GET_NESTED_STATE")
        buf = (ctypes.c_uint8 * max(size, ctypes.sizeof(abi.kvm_nested_state)))()
        state = abi.kvm_nested_state.from_buffer(buf)
        state.size = len(buf)
        self.ioctl(abi.KVM_GET_NESTED_STATE, state)
        return state

    def set_nested_state(self, state: Any) -> None:
        self.vm.require(abi.Capability.NESTED_STATE, "KVM_SET_NESTED_STATE")
        self.ioctl(abi.KVM_SET_NESTED_STATE, state)

    def dirty_ring(self) -> list[tuple[int, int]]:
        """Harvest this vCPU's dirty ring: [(slot, page offset in the slot), ...] in order.

        Each harvested entry is marked for reset; vm.reset_dirty_rings() then re-arms them.
        """
        entries = self.vm.dirty_ring_entries
        if not entries:
            raise ValueError("the dirty ring is off; call vm.enable_dirty_ring() before "
                             "creating vCPUs")
        if self._ring is None:
            self._ring = mmap.mmap(self.fd, entries * ctypes.sizeof(abi.kvm_dirty_gfn),
                                   mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                   offset=abi.KVM_DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE)
        ring = (abi.kvm_dirty_gfn * entries).from_buffer(self._ring)
        out = []
        while True:
            gfn = ring[self._ring_next % entries]
            # The kernel publishes an entry by setting DIRTY last; reading flags first
            # keeps slot/offset from being read early (x86 keeps loads in order).
            if not gfn.flags & abi.KVM_DIRTY_GFN_F_DIRTY:
                break
            out.append((int(gfn.slot), int(gfn.offset)))
            gfn.flags = abi.KVM_DIRTY_GFN_F_RESET
            self._ring_next += 1
        del ring, gfn
        return out

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on this vCPU."""
        from .vm import _enable_cap
        self.vm.require(abi.Capability.ENABLE_CAP, "KVM_ENABLE_CAP on a vCPU")
        self.ioctl(abi.KVM_ENABLE_CAP, _enable_cap(cap, args, flags))

    def stats(self) -> Stats:
        from .stats import Stats
        self.vm.require(abi.Capability.BINARY_STATS_FD, "KVM_GET_STATS_FD")
        return Stats(self.ioctl(abi.KVM_GET_STATS_FD))

    # -- coalesced MMIO ring, shared through this vCPU's mapping
    def coalesced_mmio(self) -> list[tuple[int, bytes, bool]]:
        """Drain the coalesced MMIO/PIO ring: [(address, data, is_pio), ...] oldest first."""
        page = self.vm.require(abi.Capability.COALESCED_MMIO, "coalesced MMIO")
        ring = abi.kvm_coalesced_mmio_ring.from_buffer(self._page, page * mmap.PAGESIZE)
        entry_size = ctypes.sizeof(abi.kvm_coalesced_mmio)
        # The ring fills the rest of its page (KVM_COALESCED_MMIO_MAX, which needs PAGE_SIZE).
        slots = (mmap.PAGESIZE - ctypes.sizeof(abi.kvm_coalesced_mmio_ring)) // entry_size
        entries = (abi.kvm_coalesced_mmio * slots).from_buffer(
            self._page, page * mmap.PAGESIZE + member(abi.kvm_coalesced_mmio_ring, "coalesced_mmio")[0])
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
    def _release(self) -> None:
        if self._ring is not None:
            self._ring.close()
        self._decoder.release()
        del self.kvm_run
        try:
            self._page.close()
        except BufferError:
            pass    # an exit's data view is still held: the page goes when it does

    def __repr__(self) -> str:
        if self.closed:
            return f"<Vcpu {self.id} closed>"
        return f"<Vcpu {self.id} fd={self._fd}>"
