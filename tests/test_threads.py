"""vCPUs in threads: kick(), immediate_exit, and two vCPUs running at once."""

from __future__ import annotations

import threading
import time

from kvm_bindings import ExitReason, InterruptedExit, IoExit

GIVE_UP = 20.0   # seconds before a stuck thread fails the test instead of hanging it


def _run_in_thread(vcpu):
    result: dict = {}

    def body():
        try:
            result["exit"] = vcpu.run()
        except BaseException as e:      # surfaced by the test
            result["error"] = e
    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, result


def _wait_until_in_guest(vcpu, thread):
    deadline = time.monotonic() + GIVE_UP
    while vcpu._runner is None and thread.is_alive():
        assert time.monotonic() < deadline, "the vCPU thread never entered KVM_RUN"
        time.sleep(0.001)
    time.sleep(0.01)   # let it get past the ioctl entry into the guest


def test_kick_from_another_thread_interrupts_a_spinning_guest(real_mode):
    vcpu = real_mode("spin")
    t, result = _run_in_thread(vcpu)
    _wait_until_in_guest(vcpu, t)
    vcpu.kick()
    t.join(GIVE_UP)
    assert not t.is_alive(), "kick() did not make run() return"
    assert isinstance(result["exit"], InterruptedExit)
    assert result["exit"].reason is ExitReason.INTR
    assert not vcpu.immediate_exit               # consumed by the interrupted run


def test_immediate_exit_returns_before_entering_the_guest(real_mode):
    vcpu = real_mode("port_io")
    vcpu.immediate_exit = True
    assert isinstance(vcpu.run(), InterruptedExit)
    first = vcpu.run()                             # now the guest really runs, from the start
    assert isinstance(first, IoExit) and bytes(first.data) == b"H"


def test_kick_before_run_is_not_lost(real_mode):
    vcpu = real_mode("spin")
    vcpu.kick()                                    # nobody is running yet
    t, result = _run_in_thread(vcpu)
    t.join(GIVE_UP)
    assert not t.is_alive() and isinstance(result["exit"], InterruptedExit)


def test_two_vcpus_in_two_threads_run_at_the_same_time(vm, assemble):
    """vCPU 0 spins until vCPU 1 sets a flag: it can only finish if both run concurrently,
    which needs run() to release the GIL."""
    from kvm_bindings import x86
    vm.memory.write(0x1000, assemble("two_vcpus"))
    vcpus = []
    for i in range(2):
        v = vm.create_vcpu(i)
        x86.setup_real_mode(v, 0x1000)
        regs = v.get_regs()
        regs.rax = i
        v.set_regs(regs)
        vcpus.append(v)
    t0, r0 = _run_in_thread(vcpus[0])
    _wait_until_in_guest(vcpus[0], t0)
    t1, r1 = _run_in_thread(vcpus[1])
    t1.join(GIVE_UP)
    t0.join(GIVE_UP)
    if t0.is_alive():
        vcpus[0].kick()
        t0.join(GIVE_UP)
    assert isinstance(r1["exit"], IoExit) and r1["exit"].port == 0x3F9
    assert isinstance(r0["exit"], IoExit) and r0["exit"].port == 0x3F8, r0


def test_python_threads_keep_running_while_a_vcpu_is_in_the_guest(real_mode):
    vcpu = real_mode("spin")
    t, result = _run_in_thread(vcpu)
    _wait_until_in_guest(vcpu, t)
    counted = 0
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:
        counted += 1                               # this thread holds the GIL meanwhile
    vcpu.kick()
    t.join(GIVE_UP)
    assert counted > 1000 and isinstance(result["exit"], InterruptedExit)


def test_the_ctypes_kvm_run_path_runs_guests_and_takes_kicks(real_mode, monkeypatch):
    # Where fcntl.ioctl retries EINTR itself (CPython 3.14 on), run() calls KVM_RUN through
    # ctypes instead; that path is exercised here on whatever interpreter runs the tests.
    import ctypes

    from kvm_bindings import abi
    from kvm_bindings import vcpu as vcpu_module
    monkeypatch.setattr(vcpu_module, "_run_ioctl", vcpu_module._run_ioctl_ctypes)
    monkeypatch.setattr(vcpu_module, "_KVM_RUN", ctypes.c_ulong(abi.KVM_RUN))
    vcpu = real_mode("port_io")
    first = vcpu.run()
    assert isinstance(first, IoExit) and bytes(first.data) == b"H"
    vcpu.kick()
    t, result = _run_in_thread(vcpu)
    t.join(GIVE_UP)
    assert not t.is_alive() and isinstance(result["exit"], InterruptedExit)
    assert not vcpu.immediate_exit
    spin = real_mode("spin", vcpu_id=1)
    t, result = _run_in_thread(spin)
    _wait_until_in_guest(spin, t)
    spin.kick()
    t.join(GIVE_UP)
    assert not t.is_alive() and isinstance(result["exit"], InterruptedExit)
