"""Adversarial tests of the fast Vcpu.run() (commit e28c2b4 and after): the list-token run
gate, fcntl KVM_RUN, exits decoded in run(), plain data slots with a stale stand-in, and
exit objects recycled by reference count.

Part 1 holds what an adversarial pass found broken, each fixed since and kept as a test
that the fix holds. Part 2 holds probes, each saying what broken code it would catch.
Anything that can wedge or kill the interpreter runs in a child process.
"""

from __future__ import annotations

import copy
import errno
import gc
import json
import os
import pickle
import re
import subprocess
import sys
import threading
import time

import pytest

from kvm_bindings import (
    HltExit,
    InterruptedExit,
    IoExit,
    MmioExit,
    StaleExitError,
    StaleHandleError,
    VcpuBusyError,
    abi,
    exits,
    x86,
)
from kvm_bindings import vcpu as vcpu_module
from kvm_bindings._layout import offset_of
from tests.conftest import LOAD_ADDR, ROOT
from tests.test_reliability import _in_thread

GIVE_UP = 10.0



def _fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _inline(vm, code: bytes, vcpu_id: int = 0):
    """A vCPU about to run code (a guest from tests/guests, assembled) in real mode."""
    vm.memory.write(LOAD_ADDR, code)
    v = vm.create_vcpu(vcpu_id)
    x86.setup_real_mode(v, LOAD_ADDR)
    return v


def _with_guests(code: str, assemble) -> str:
    """A child's code with each @name@ replaced by the hex of tests/guests/<name>.S."""
    return re.sub(r"@(\w+)@", lambda m: assemble(m.group(1)).hex(), code)


def _thread(target):
    return _in_thread(target, name="attacker")



def _wait_running(vcpu, t) -> None:
    deadline = time.monotonic() + GIVE_UP
    while vcpu._runner is None and t.is_alive():
        assert time.monotonic() < deadline, "the vCPU thread never entered run()"
        time.sleep(0.001)
    time.sleep(0.02)


def _child(code: str, timeout: float = 60) -> dict:
    """Run code in a fresh interpreter (cwd = repo root); it prints JSON as its last line."""
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"child exited with status {proc.returncode}\n--- stdout\n"
                                  f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# =========================================================================================
# Part 1: defects found by attacking run(), fixed
# =========================================================================================

def test_assigning_data_of_an_in_exit_is_the_answer(real_mode):
    """Found: IoExit.data is a plain slot, and `e.data = b"Z"` on an IN exit (the obvious
    way to answer) was accepted and the answer silently dropped. Now what data holds at the
    next run() is the answer: the guest gets b"Z"."""
    vcpu = real_mode("port_io")
    out = vcpu.run()
    assert isinstance(out, IoExit) and out.is_write and bytes(out.data) == b"H"
    inp = vcpu.run()
    assert isinstance(inp, IoExit) and not inp.is_write
    inp.data = b"Z"
    echo = vcpu.run()                   # the guest OUTs what its IN read to 0x3f9
    assert isinstance(echo, IoExit) and echo.port == 0x3F9
    assert bytes(echo.data) == b"Z", (f"e.data = b'Z' was accepted but the guest read "
                                      f"{bytes(echo.data)!r}: the answer was silently lost")


def test_a_signal_handlers_exception_never_leaves_the_gate_taken(assemble):
    """Found: run() took the gate token with gate.pop(), a call, after which CPython runs
    pending signal handlers, before its try/finally began: a handler's exception (Ctrl-C,
    a SIGALRM timeout) left the vCPU busy for ever ("running in thread None") and close()
    deferring to a run() that never returns, leaking the fd. Now nothing between taking
    the token (del gate[0]) and the try is such a point. A SIGALRM every 30 µs, for 3 s."""
    code = r'''
import json, os, signal, sys, time
from kvm_bindings import Kvm, x86, VcpuBusyError, InterruptedExit
fds = lambda: sorted(int(n) for n in os.listdir("/proc/self/fd"))
class Boom(Exception): pass
state = {"armed": False}
def handler(s, f):
    if state["armed"]:
        state["armed"] = False
        raise Boom()
signal.signal(signal.SIGALRM, handler)
before = fds()
res = {"runs": 0, "booms": 0, "lost": False}
kvm = Kvm(); vm = kvm.create_vm()
vm.set_tss_addr(0xFFFBD000); vm.add_memory(0, 0x10000)
vm.memory.write(0x1000, bytes.fromhex("@out_loop@"))
v = vm.create_vcpu(0); x86.setup_real_mode(v, 0x1000)
deadline = time.monotonic() + 3
signal.setitimer(signal.ITIMER_REAL, 0.00003, 0.00003)
while True:
    try:
        state["armed"] = True           # the handler disarms as it raises: one Boom at a time
        while time.monotonic() < deadline and v._gate:   # (the token there: nobody holds it)
            res["runs"] += 1
            v.run()
        state["armed"] = False
        break
    except Boom:
        res["booms"] += 1
res["lost"] = not v._gate
signal.setitimer(signal.ITIMER_REAL, 0)
state["armed"] = False
try:
    v.immediate_exit = True
    res["after"] = type(v.run()).__name__
except Exception as e:
    res["after"] = f"{type(e).__name__}: {e}"
vm.close(); kvm.close()
res["leaked_fds"] = [f for f in fds() if f not in before]
print(json.dumps(res))
'''
    res = _child(_with_guests(code, assemble))
    assert res["booms"] > 0, res
    assert not res["lost"] and res["after"] == "InterruptedExit" and not res["leaked_fds"], (
        f"a signal handler's exception left run() holding the gate: {res}")


def test_an_in_answer_never_spills_past_its_data_area(vm, assemble):
    """Found: the caller could release data's view and grow the bytearray behind it
    (e.data.obj), and the next run() copied all of it into the kvm_run mapping, past the
    1-byte IN's data area. Now an answer of any other size is refused (ValueError) and
    nothing is written."""
    vcpu = _inline(vm, assemble("in_loop"))
    e = vcpu.run()
    assert isinstance(e, IoExit) and not e.is_write and e.size * e.count == 1
    start = vcpu._decoder.answer[0]
    page = vcpu._page
    page[start + 1:start + 64] = bytes(63)
    buf = e.data.obj
    e.data.release()
    buf.extend(b"\xAA" * 63)
    vcpu.immediate_exit = True
    with pytest.raises(ValueError, match="read 1 byte"):
        vcpu.run()
    assert bytes(page[start + 1:start + 64]) == bytes(63), (
        "a 1-byte IN answer wrote beyond its data area: "
        f"{bytes(page[start:start + 16]).hex()}...")


def test_a_stale_answer_refuses_copy_and_pickle(real_mode):
    """Found: copy.copy() and pickle.dumps() of a stale exit.data succeeded, making a new
    stand-in that even repr's `is` check did not recognise. Now they raise StaleExitError."""
    vcpu = real_mode("port_io")
    vcpu.run()
    inp = vcpu.run()
    vcpu.run()
    stale = inp.data
    assert stale is exits._STALE_ANSWER
    failures = []
    for name, attempt in (("copy.copy", lambda: copy.copy(stale)),
                          ("pickle.dumps", lambda: pickle.dumps(stale))):
        try:
            got = attempt()
        except StaleExitError:
            continue
        failures.append(f"{name}(stale data) returned {got!r}")
    assert not failures, "; ".join(failures)


def test_an_answer_of_the_wrong_size_is_refused_once_and_the_vcpu_goes_on(real_mode):
    vcpu = real_mode("port_io")
    vcpu.run()
    inp = vcpu.run()
    inp.data = b"too long"
    with pytest.raises(ValueError, match="read 1 byte"):
        vcpu.run()                          # refused before KVM_RUN: nothing delivered
    with pytest.raises(StaleExitError):
        inp.data[0]                         # noqa: B018
    echo = vcpu.run()                       # the guest goes on: its IN got the page's bytes
    assert isinstance(echo, IoExit) and echo.port == 0x3F9 and echo.is_write


def test_a_vcpu_being_closed_keeps_its_kick_so_no_later_run_enters_the_guest(vm, assemble):
    # A close that gave up waiting (the kick signal blocked in the running thread) leaves
    # the teardown to that run(); between its giving the gate back and taking it again,
    # another thread's run() must not enter the guest, where nobody would kick it. What
    # stops it: immediate_exit, once set for a vCPU being closed, is never cleared.
    vcpu = _inline(vm, assemble("spin"))
    vcpu._halted = True                     # as close() does before it kicks
    vcpu.kick()
    for _ in range(3):
        with pytest.raises(StaleHandleError, match="closed while"):
            vcpu.run()                      # EINTR at once: the guest (a spin) is not entered
        assert vcpu.immediate_exit is True
    vcpu._halted = False
    vcpu.immediate_exit = False


# =========================================================================================
# Part 2: probes (each names the broken implementation it would catch)
# =========================================================================================

def test_real_sigint_in_kvm_run_leaves_the_vcpu_usable(assemble):
    # Catches: the gate or _runner not restored when KeyboardInterrupt comes out of
    # fcntl.ioctl (handler run by PyErr_SetFromErrno), or immediate_exit left set.
    code = r'''
import json, os, signal, threading, time
from kvm_bindings import Kvm, x86, InterruptedExit, IoExit
kvm = Kvm(); vm = kvm.create_vm()
vm.set_tss_addr(0xFFFBD000); vm.add_memory(0, 0x10000)
vm.memory.write(0x1000, bytes.fromhex("@spin@"))
v = vm.create_vcpu(0); x86.setup_real_mode(v, 0x1000)
main = threading.get_ident()
def poke():
    while v._runner is None: time.sleep(0.001)
    time.sleep(0.1)
    signal.pthread_kill(main, signal.SIGINT)
t = threading.Thread(target=poke, daemon=True); t.start()
res = {}
try:
    v.run(); res["ki"] = False
except KeyboardInterrupt:
    res["ki"] = True
t.join(5)
res["gate"] = v._gate == [None]; res["runner"] = v._runner
res["imm"] = v.immediate_exit
k = threading.Thread(target=lambda: (time.sleep(0.1), v.kick()), daemon=True); k.start()
res["next"] = type(v.run()).__name__
vm.close(); kvm.close()
print(json.dumps(res))
'''
    res = _child(_with_guests(code, assemble))
    assert res == {"ki": True, "gate": True, "runner": None, "imm": False,
                   "next": "InterruptedExit"}, res


def test_close_from_a_signal_handler_inside_run_finishes_without_leaking(assemble):
    # Catches: close() in the run()ning thread waiting for itself (deadlock), run() not
    # finishing the deferred teardown, or the fd kept open for ever.
    code = r'''
import json, os, signal, threading, time
from kvm_bindings import Kvm, x86, StaleHandleError
fds = lambda: sorted(int(n) for n in os.listdir("/proc/self/fd"))
kvm = Kvm(); vm = kvm.create_vm()
vm.set_tss_addr(0xFFFBD000); vm.add_memory(0, 0x10000)
vm.memory.write(0x1000, bytes.fromhex("@spin@"))
before = fds()
v = vm.create_vcpu(0); x86.setup_real_mode(v, 0x1000)
signal.signal(signal.SIGUSR1, lambda s, f: v.close())
main = threading.get_ident()
def poke():
    while v._runner is None: time.sleep(0.001)
    time.sleep(0.1); signal.pthread_kill(main, signal.SIGUSR1)
threading.Thread(target=poke, daemon=True).start()
res = {}
try:
    v.run(); res["err"] = None
except StaleHandleError as e:
    res["err"] = str(e)
try:
    v.run()
except Exception as e:
    res["again"] = type(e).__name__
res["closed"] = v.closed
res["leak"] = [f for f in fds() if f not in before]
vm.close(); kvm.close()
print(json.dumps(res))
'''
    res = _child(_with_guests(code, assemble))
    assert res["err"] and "closed while" in res["err"], res
    assert res["again"] == "StaleHandleError" and res["closed"] and res["leak"] == [], res


def test_vm_close_from_another_thread_while_a_vcpu_runs(kvm, assemble):
    # Catches: a run() that returns an exit (or hangs) after its VM closed, a VcpuBusyError
    # instead of StaleHandleError, and fds/mappings left open.
    before = _fds()
    vm = kvm.create_vm()
    vm.set_tss_addr(0xFFFBD000)
    vm.add_memory(0, 0x10000)
    vcpu = _inline(vm, assemble("spin"))
    t, result = _thread(vcpu.run)
    _wait_running(vcpu, t)
    vm.close()
    t.join(GIVE_UP)
    assert not t.is_alive()
    err = result.get("error")
    assert isinstance(err, StaleHandleError) and "closed while" in str(err), result
    with pytest.raises(StaleHandleError):
        vcpu.run()
    assert _fds() == before


@pytest.mark.parametrize("what", ["vcpu", "vm"])
def test_run_on_closed_vcpu_or_vm_is_stale_not_busy(vm, what, assemble):
    # Catches: a closed vCPU's taken gate reported as VcpuBusyError about some thread.
    vcpu = _inline(vm, assemble("hlt"))
    (vcpu if what == "vcpu" else vm).close()
    for _ in range(3):
        with pytest.raises(StaleHandleError) as info:
            vcpu.run()
        assert not isinstance(info.value, VcpuBusyError) and "thread" not in str(info.value)


def test_two_threads_racing_run_one_is_refused_and_the_other_unharmed(vm, assemble):
    # Catches: a gate that lets two threads into KVM_RUN, or a refused run() that returns
    # the token it never took (then a third run would get in too).
    vcpu = _inline(vm, assemble("spin"))
    t, result = _thread(vcpu.run)
    _wait_running(vcpu, t)
    for _ in range(50):
        with pytest.raises(VcpuBusyError, match="running in"):
            vcpu.run()
    assert vcpu._runner == t.ident
    vcpu.kick()
    t.join(GIVE_UP)
    assert isinstance(result.get("value"), InterruptedExit)
    assert vcpu._gate == [None] and vcpu._runner is None and not vcpu.immediate_exit


def test_kept_exits_never_change_whoever_holds_them(real_mode):
    # Catches: a refcount test off by one (refilling an exit held once elsewhere) or any
    # holder invisible to it. Holders: list, dict, closure cell, set of (id,obj) tuple,
    # another thread's local, a traceback's frame, a generator frame.
    vcpu = real_mode("numbered_exits")
    kept: list = []
    held_by_thread: list = []
    gate = threading.Event()

    def thread_holder(e, snap):
        local = e                       # noqa: F841 - held only by this frame
        gate.wait(GIVE_UP)
        held_by_thread.append((local, snap))

    def make_closure(e):
        return lambda: e

    def gen(e):
        yield
        yield e

    def tb_holder(e):
        try:
            raise RuntimeError(e)
        except RuntimeError as x:
            return x

    holders = []
    threads = []
    reused = 0
    for i in range(3000):
        spares = {id(vcpu._io_spare), id(vcpu._mmio_spare)}
        e = vcpu.run()
        reused += id(e) in spares
        if isinstance(e, HltExit):
            break
        if isinstance(e, IoExit) and not e.is_write:
            e.data[0] = i & 0xFF
            snap = (type(e), e.port, False, None)
        else:
            snap = (type(e), e.port if isinstance(e, IoExit) else e.phys_addr, e.is_write,
                    bytes(e.data))
        kind = i % 11
        if kind == 0:
            kept.append((e, snap))
        elif kind == 1:
            holders.append(({"x": e}, snap, lambda h: h["x"]))
        elif kind == 2:
            holders.append((make_closure(e), snap, lambda h: h()))
        elif kind == 3:
            g = gen(e)
            next(g)
            holders.append((g, snap, lambda h: next(h)))
        elif kind == 4:
            holders.append((tb_holder(e), snap, lambda h: h.args[0]))
        elif kind == 5 and len(threads) < 20:
            t = threading.Thread(target=thread_holder, args=(e, snap), daemon=True)
            t.start()
            threads.append(t)
        del e
    else:
        pytest.fail("the guest did not halt")
    gate.set()
    for t in threads:
        t.join(GIVE_UP)
    if vcpu_module._refcount is sys.getrefcount:
        assert reused > 100
    everything = kept + held_by_thread + [(get(h), snap) for h, snap, get in holders]
    assert len(everything) > 250
    for e, (cls, where, is_write, data) in everything:
        assert type(e) is cls and e.is_write is is_write
        assert (e.port if isinstance(e, IoExit) else e.phys_addr) == where
        if data is None:
            with pytest.raises(StaleExitError):
                e.data[0]               # noqa: B018
        else:
            assert bytes(e.data) == data, f"kept {e!r} changed"


def test_gc_get_objects_grab_of_a_spare_blocks_its_reuse(vm, assemble):
    # Catches: reuse decided by anything weaker than the reference count (say, "not
    # returned by the last run"): an exit fished out of gc.get_objects() must stay put.
    vcpu = _inline(vm, assemble("out_loop"))
    vcpu.run()
    vcpu.run()
    fished = [o for o in gc.get_objects() if type(o) is IoExit and o is vcpu._io_spare]
    assert len(fished) == 1
    snap = (fished[0].port, bytes(fished[0].data))
    vm.memory.write(LOAD_ADDR + 1, b"\xf9")          # later OUTs go to 0x3f9
    x86.setup_real_mode(vcpu, LOAD_ADDR)
    for _ in range(20):
        e = vcpu.run()
        assert e is not fished[0]
    assert (fished[0].port, bytes(fished[0].data)) == snap == (0x3F8, b"\x00")


def test_an_in_answer_survives_a_kick_between_exit_and_next_run(vm, assemble):
    # Catches: an answer delivered by the INTR run and then dropped or overwritten, or one
    # delivered twice / to a recycled exit. The guest: IN, then OUT of what it read.
    vcpu = _inline(vm, assemble("in_then_out"))
    e = vcpu.run()
    assert isinstance(e, IoExit) and not e.is_write
    e.data[:] = b"Q"
    vcpu.kick()
    assert isinstance(vcpu.run(), InterruptedExit)
    with pytest.raises(StaleExitError):
        e.data[0] = 1
    out = vcpu.run()
    assert isinstance(out, IoExit) and out.is_write and bytes(out.data) == b"Q"


def _stubbed(monkeypatch, vcpu):
    """run() decodes the page as it stands: KVM_RUN is a no-op."""
    monkeypatch.setattr(vcpu_module, "_run_ioctl", lambda fd, number: 0)
    return vcpu._page, vcpu.kvm_run


def test_alternating_io_and_mmio_exits_decode_right_whatever_the_guess(vm, monkeypatch, assemble):
    # Catches: _mmio_first used without the re-unpack, so an IO exit read with MMIO's
    # layout (or the reverse), and answers delivered to the wrong member.
    vcpu = _inline(vm, assemble("hlt"))
    page, run = _stubbed(monkeypatch, vcpu)
    io_data = abi.KVM_PIO_PAGE_OFFSET * 4096
    mmio_data = offset_of(abi.kvm_run, "mmio") + 8 + 0     # phys_addr then data
    pattern = "IMMIIMIIIMMMIMIM" * 8
    reason_at = offset_of(abi.kvm_run, "exit_reason")
    for n, kind in enumerate(pattern):
        if kind == "I":
            run.exit_reason = int(abi.ExitReason.IO)
            run.io.direction, run.io.size, run.io.port = n & 1, 2, 0x100 + n
            run.io.count, run.io.data_offset = 1, io_data
            page[io_data:io_data + 2] = bytes([n, 0x55])
        else:
            run.exit_reason = int(abi.ExitReason.MMIO)
            run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = 0xD0000 + n, 4, n & 1
            page[mmio_data:mmio_data + 4] = bytes([n, 1, 2, 3])
        e = vcpu.run()
        if kind == "I":
            assert isinstance(e, IoExit) and e.port == 0x100 + n and e.size == 2
            assert e.count == 1 and e.is_write is bool(n & 1)
            assert bytes(e.data) == bytes([n, 0x55])
            if not e.is_write:
                e.data[:] = b"\xA1\xA2"
        else:
            assert isinstance(e, MmioExit) and e.phys_addr == 0xD0000 + n
            assert len(e.data) == 4 and bytes(e.data) == bytes([n, 1, 2, 3])
            if not e.is_write:
                e.data[:] = b"\xB1\xB2\xB3\xB4"
        prev = (kind, bool(not e.is_write))
        # the next run() delivers the answer to exactly its own area
        run_before = bytes(page[:io_data + 16])
        del e
        if prev[1]:
            run.exit_reason = int(abi.ExitReason.HLT)
            assert isinstance(vcpu.run(), HltExit)
            if prev[0] == "I":
                assert bytes(page[io_data:io_data + 2]) == b"\xA1\xA2"
            else:
                assert bytes(page[mmio_data:mmio_data + 4]) == b"\xB1\xB2\xB3\xB4"
            changed = [i for i in range(len(run_before)) if page[i] != run_before[i]
                       and not (io_data <= i < io_data + 2 or mmio_data <= i < mmio_data + 4
                                or reason_at <= i < reason_at + 4)]
            assert changed == [], f"an answer touched bytes {changed[:8]}"


def test_reply_to_a_payload_exit_after_a_recycled_io_exit_writes_nothing(vm, monkeypatch, assemble):
    # Catches: reply() staleness tied to something recycling can fool (an exit object's
    # identity or seq reused), so a late reply lands in the live kvm_run.
    vcpu = _inline(vm, assemble("hlt"))
    page, run = _stubbed(monkeypatch, vcpu)
    run.exit_reason = int(abi.ExitReason.X86_RDMSR)
    run.msr.index, run.msr.data, run.msr.error = 0x1234, 0, 0
    rd = vcpu.run()
    for _ in range(5):                  # IO exits: spares rotate and get refilled
        run.exit_reason = int(abi.ExitReason.IO)
        run.io.direction, run.io.size, run.io.port, run.io.count = 1, 1, 0x80, 1
        run.io.data_offset = abi.KVM_PIO_PAGE_OFFSET * 4096
        vcpu.run()
    snapshot = bytes(page)
    with pytest.raises(StaleExitError):
        rd.reply(0xFFFF)
    assert bytes(page) == snapshot
    # and a reply to the current one works and lands
    run.exit_reason = int(abi.ExitReason.X86_RDMSR)
    rd2 = vcpu.run()
    rd2.reply(0xABCD)
    assert run.msr.data == 0xABCD


def test_reply_while_another_thread_runs_is_refused_and_writes_nothing(vm, monkeypatch, assemble):
    # Catches: reply() not taking the gate (it would write the live member under a run).
    vcpu = _inline(vm, assemble("spin"))
    real = vcpu_module._run_ioctl
    page, run = _stubbed(monkeypatch, vcpu)
    run.exit_reason = int(abi.ExitReason.X86_RDMSR)
    rd = vcpu.run()
    monkeypatch.setattr(vcpu_module, "_run_ioctl", real)
    run.exit_reason = 0
    t, result = _thread(vcpu.run)
    _wait_running(vcpu, t)
    with pytest.raises(StaleExitError):
        rd.reply(7)
    vcpu.kick()
    t.join(GIVE_UP)
    assert isinstance(result.get("value"), InterruptedExit), result
    assert run.msr.data != 7


def test_ctypes_path_takes_kicks_answers_ins_and_reports_closed(vm, monkeypatch, assemble):
    # Catches: the ctypes KVM_RUN path (CPython 3.14+) mishandling errno: EINTR not an
    # InterruptedExit, immediate_exit not cleared, or a close during it not reported.
    monkeypatch.setattr(vcpu_module, "_run_ioctl", vcpu_module._run_ioctl_ctypes)
    monkeypatch.setattr(vcpu_module, "_KVM_RUN", __import__("ctypes").c_ulong(abi.KVM_RUN))
    vcpu = _inline(vm, assemble("in_then_out"))
    e = vcpu.run()
    e.data[:] = b"C"
    vcpu.kick()
    assert isinstance(vcpu.run(), InterruptedExit) and not vcpu.immediate_exit
    out = vcpu.run()
    assert bytes(out.data) == b"C"
    t, result = _thread(vcpu.run)
    _wait_running(vcpu, t)
    vcpu.kick()
    t.join(GIVE_UP)
    assert isinstance(result.get("value"), InterruptedExit)
    t, result = _thread(vcpu.run)
    _wait_running(vcpu, t)
    vcpu.close()
    t.join(GIVE_UP)
    assert isinstance(result.get("error"), StaleHandleError), result


def test_kick_after_run_returned_an_exit_stops_the_next_run_only(vm, assemble):
    # Catches: a kick consumed by the wrong run (lost), or one that sticks (every later
    # run INTR).
    vcpu = _inline(vm, assemble("out_loop"))
    assert isinstance(vcpu.run(), IoExit)
    vcpu.kick()
    vcpu.kick()
    assert isinstance(vcpu.run(), InterruptedExit)
    for _ in range(5):
        assert isinstance(vcpu.run(), IoExit)


def test_kvm_run_error_other_than_eintr_is_kvm_error_and_gate_returned(vm, monkeypatch, assemble):
    # Catches: fcntl's OSError for a non-EINTR errno surfacing raw, or the gate lost.
    from kvm_bindings import KvmError
    vcpu = _inline(vm, assemble("hlt"))

    def failing(fd, number):
        raise OSError(errno.EFAULT, "bad")
    monkeypatch.setattr(vcpu_module, "_run_ioctl", failing)
    vcpu.immediate_exit = True
    with pytest.raises(KvmError) as info:
        vcpu.run()
    assert info.value.errno == errno.EFAULT
    assert vcpu._gate == [None] and vcpu._runner is None and not vcpu.immediate_exit


def test_stale_data_refuses_the_everyday_uses(real_mode):
    # Catches: a stand-in that quietly compares, tests false, indexes or converts.
    vcpu = real_mode("port_io")
    vcpu.run()
    inp = vcpu.run()
    view = inp.data
    vcpu.run()
    s = inp.data
    for use in (lambda: s[0], lambda: bytes(s), lambda: len(s), lambda: bool(s),
                lambda: s == b"\x00", lambda: s != b"\x00", lambda: b"x" in s,
                lambda: list(s), lambda: s.tobytes(), lambda: bytearray(s),
                lambda: s.__setitem__(0, 1), lambda: int.from_bytes(s, "little")):
        with pytest.raises(StaleExitError):
            use()
    with pytest.raises(ValueError):     # the released view the caller kept
        view[0] = 1
    assert repr(inp).endswith("data=<stale>>")
