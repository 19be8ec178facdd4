"""The misuse matrix: every way an adversarial user broke the runtime, each now a clear
Python exception or correct behaviour. Cases that once crashed the interpreter run in a
subprocess, so a regression fails the test instead of killing pytest."""

from __future__ import annotations

import copy
import ctypes
import errno
import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest

from kvm_bindings import (
    GuestMemoryError,
    IoExit,
    KvmError,
    StaleExitError,
    StaleHandleError,
    abi,
    x86,
)
from kvm_bindings.memory import PAGE_SIZE

from .conftest import REQUIRE_KVM, ROOT, need


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _in_subprocess(body: str, *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run body with a Kvm as `kvm` in a fresh interpreter; a crash shows as a signal exit."""
    code = "import sys\nfrom kvm_bindings import *\nfrom kvm_bindings import abi, x86\nkvm = Kvm()\n"
    code += textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


# ---- 1. handles that know what they name ---------------------------------------------

def test_dirty_log_of_a_removed_region_whose_slot_was_reused_is_refused(kvm):
    """Once SIGSEGV every time: KVM filled a bitmap sized for the old, smaller region."""
    result = _in_subprocess("""
        vm = kvm.create_vm()
        old = vm.add_memory(0x100000, 0x1000, log_dirty=True)
        vm.remove_memory(old)
        big = vm.add_memory(0x10000000, 0x10000000, log_dirty=True)    # 256 MiB, same slot
        assert big.slot == old.slot
        try:
            vm.get_dirty_log(old)
        except StaleHandleError as e:
            print("refused:", e)
        print("live region still answers:", list(vm.get_dirty_log(big)) == [])
    """)
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "was removed" in result.stdout
    assert "live region still answers: True" in result.stdout


def test_a_region_of_another_vm_is_refused_by_every_call_taking_a_region(kvm):
    result = _in_subprocess("""
        a, b = kvm.create_vm(), kvm.create_vm()
        ra = a.add_memory(0, 0x1000, log_dirty=True)
        b.add_memory(0, 0x100000, log_dirty=True)           # b's slot 0 is larger
        calls = [lambda: b.get_dirty_log(ra), lambda: b.remove_memory(ra),
                 lambda: b.set_dirty_logging(ra, False), lambda: b.move_memory(ra, 0x200000),
                 lambda: b.clear_dirty_log(ra)]
        for call in calls:
            try:
                call()
            except StaleHandleError as e:
                assert "belongs to" in str(e), e
                print("refused")
            except KvmUnsupported:
                print("refused")      # clear_dirty_log: the capability check comes first
        print("a still has its region:", a.memory.regions == (ra,))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("refused") == 5
    assert "a still has its region: True" in result.stdout


def test_removing_a_region_twice_does_not_touch_the_slot_that_reused_its_number(vm, real_mode):
    first = vm.add_memory(0xD0000, 0x1000)
    vm.remove_memory(first)
    second = vm.add_memory(0xD0000, 0x1000)          # same slot number, same GPA
    assert second.slot == first.slot
    with pytest.raises(StaleHandleError, match="was removed"):
        vm.remove_memory(first)
    assert second in vm.memory.regions
    # KVM still has the slot: the mmio guest's write to 0xd0010 lands in memory, no exit
    vcpu = real_mode("mmio")
    e = vcpu.run()                               # the write went to memory: no MMIO exit for it
    assert not (e.reason.name == "MMIO" and e.phys_addr == 0xD0010), e
    assert vm.memory.read(0xD0010, 4) == (0xCAFEF00D).to_bytes(4, "little")


def test_set_dirty_logging_on_a_removed_region_creates_no_slot(vm):
    region = vm.add_memory(0x20000, 0x1000)
    vm.remove_memory(region)
    with pytest.raises(StaleHandleError):
        vm.set_dirty_logging(region, True)
    with pytest.raises(StaleHandleError):
        region.view()
    assert vm.memory.region_at(0x20000) is None
    # KVM has no slot there either: a new region at that GPA and slot is accepted
    assert vm.add_memory(0x20000, 0x1000, slot=region.slot).slot == region.slot


def test_a_failed_kvm_call_leaves_the_region_as_it_was(vm, monkeypatch):
    region = vm.add_memory(0x20000, 0x1000)
    real = vm._set_region

    def refuse(*args, **kwargs):
        raise KvmError("KVM_SET_USER_MEMORY_REGION", errno.EFAULT)
    monkeypatch.setattr(vm, "_set_region", refuse)
    with pytest.raises(KvmError):
        vm.set_dirty_logging(region, True)
    assert not region.flags & abi.KVM_MEM_LOG_DIRTY_PAGES
    with pytest.raises(KvmError):
        vm.remove_memory(region)
    monkeypatch.setattr(vm, "_set_region", real)
    assert region in vm.memory.regions and not region.removed


# ---- 2. teardown order ------------------------------------------------------------------

def _record_teardown(monkeypatch, vm):
    """Record, in order, KVM slot deletions and unmaps."""
    from kvm_bindings.memory import MemoryRegion
    events: list[tuple[str, int]] = []
    set_region, unmap = type(vm)._set_region, MemoryRegion._unmap

    def spy_set(self, region, size=None, **kw):
        if size == 0:
            events.append(("delete", region.slot))
        return set_region(self, region, size=size, **kw)

    def spy_unmap(self):
        if not self.removed:
            events.append(("unmap", self.slot))
        return unmap(self)
    monkeypatch.setattr(type(vm), "_set_region", spy_set)
    monkeypatch.setattr(MemoryRegion, "_unmap", spy_unmap)
    return events


@pytest.mark.parametrize("how", ["remove", "close", "garbage collection"])
def test_kvm_forgets_a_slot_before_its_memory_is_unmapped(kvm, monkeypatch, how):
    vm = kvm.create_vm()
    events = _record_teardown(monkeypatch, vm)
    a, b = vm.add_memory(0, 0x1000), vm.add_memory(0x1000, 0x1000)
    if how == "remove":
        vm.remove_memory(a)
        vm.remove_memory(b)
        vm.close()
    elif how == "close":
        vm.close()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            del vm, a, b
            gc.collect()
    assert sorted(events) == [("delete", 0), ("delete", 1), ("unmap", 0), ("unmap", 1)]
    for slot in (0, 1):
        assert events.index(("delete", slot)) < events.index(("unmap", slot))


def test_interpreter_exit_deletes_slots_before_unmapping(kvm):
    result = _in_subprocess("""
        import threading
        from kvm_bindings import memory, vm as vm_module
        unmap, set_region = memory.MemoryRegion._unmap, vm_module.Vm._set_region
        def spy_unmap(self):
            print("unmap", self.slot, flush=True); unmap(self)
        def spy_set(self, region, size=None, **kw):
            if size == 0: print("delete", region.slot, flush=True)
            return set_region(self, region, size=size, **kw)
        memory.MemoryRegion._unmap, vm_module.Vm._set_region = spy_unmap, spy_set
        vm = kvm.create_vm()            # never closed: the interpreter's exit must do it
        vm.set_tss_addr(0xFFFBD000)
        vm.add_memory(0, 0x10000)
        vm.memory.write(0x1000, bytes.fromhex("ebfe"))      # jmp $: spins until kicked
        vcpu = vm.create_vcpu(0)
        x86.setup_real_mode(vcpu, 0x1000)
        threading.Thread(target=vcpu.run, daemon=True).start()
        import time; time.sleep(0.1)
        print("exiting", flush=True)
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("exiting\n", 1)[1].split()
    assert lines[:4] == ["delete", "0", "unmap", "0"], result.stdout


# real mode at 0x1000: 1: incw 0x2000; jmp 1b -- a guest that shows it is running
COUNTER_GUEST, COUNTER = bytes.fromhex("ff060020ebfa"), 0x2000


def _start_counting(vm, vcpu_id=0, *, before_run=None):
    """A vCPU running COUNTER_GUEST in a thread; returns once the guest has counted."""
    vm.memory.write(0x1000, COUNTER_GUEST)
    vm.memory.write_int(COUNTER, 2, 0)
    vcpu = vm.create_vcpu(vcpu_id)
    x86.setup_real_mode(vcpu, 0x1000)
    result: dict = {}

    def body():
        if before_run:
            before_run()
        try:
            result["exit"] = vcpu.run()
        except BaseException as e:
            result["error"] = e
    t = threading.Thread(target=body, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while vm.memory.read_int(COUNTER, 2) == 0:
        assert time.monotonic() < deadline, "the guest never ran"
        time.sleep(0.001)
    return vcpu, t, result


def test_vcpu_close_while_running_waits_or_defers_and_the_fd_is_closed_once(vm, monkeypatch):
    """A run() thread that blocks the kick signal cannot be stopped by close(): close() gives
    up after CLOSE_TIMEOUT, and that run() closes the fd itself when it returns."""
    from kvm_bindings import vcpu as vcpu_module
    monkeypatch.setattr(vcpu_module, "CLOSE_TIMEOUT", 0.2)
    previous = signal.signal(signal.SIGUSR1, lambda *a: None)
    try:
        vcpu, t, result = _start_counting(vm, before_run=lambda: signal.pthread_sigmask(
            signal.SIG_BLOCK, {vcpu_module.KICK_SIGNAL}))
        fd = vcpu.fd
        with pytest.warns(RuntimeWarning, match="did not leave KVM_RUN"):
            vcpu.close()
        assert vcpu.closed and t.is_alive()
        os.fstat(fd)                                 # still open: run() holds it
        signal.pthread_kill(t.ident, signal.SIGUSR1)  # an unblocked signal ends KVM_RUN
        t.join(10)
        assert not t.is_alive()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert isinstance(result["error"], StaleHandleError) and "closed" in str(result["error"])
    with pytest.raises(OSError):
        os.fstat(fd)                                 # closed by run() on its way out


def test_the_kick_signal_cannot_be_blocked_through_the_signal_mask(vm):
    from kvm_bindings.vcpu import KICK_SIGNAL
    vcpu = vm.create_vcpu(0)
    with pytest.raises(ValueError, match="kick signal"):
        vcpu.set_signal_mask([signal.SIGUSR2, KICK_SIGNAL])


# ---- 3. one owner per fd --------------------------------------------------------------

def test_handles_cannot_be_copied_or_pickled(vm):
    region = vm.add_memory(0x20000, 0x1000)
    vcpu = vm.create_vcpu(0)
    for obj in (vm.kvm, vm, vcpu, region, vm.memory):
        for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="cannot be (copied|pickled)"):
                attempt(obj)
    vm.create_vcpu(1)                  # the originals still work
    assert vm.memory.read(0x20000, 1) == b"\0"


def test_a_vm_constructor_failure_closes_its_fd_exactly_once(kvm, monkeypatch, tmp_path):
    from kvm_bindings.system import Kvm
    before = _open_fds()

    def broken(self):
        raise RuntimeError("injected")
    monkeypatch.setattr(Kvm, "get_vcpu_mmap_size", broken)
    with pytest.raises(RuntimeError, match="injected"):
        kvm.create_vm()
    monkeypatch.undo()
    assert _open_fds() == before
    # The freed number goes to the next file; a second close would close that file.
    with open(tmp_path / "bystander", "w") as bystander:
        gc.collect()
        os.fstat(bystander.fileno())


def test_create_device_test_flag_returns_no_device(vm):
    with pytest.raises(ValueError, match="has_device_type"):
        vm.create_device(abi.DeviceType.VFIO, flags=abi.KVM_CREATE_DEVICE_TEST)
    # the kernel's own answer, through the TEST flag
    assert vm.has_device_type(abi.DeviceType.VFIO) is True
    assert vm.has_device_type(abi.DeviceType.ARM_VGIC_V3) is False
    os.fstat(0)


def test_children_close_with_their_parent(vm):
    before = _kvm_fds()
    vcpu = vm.create_vcpu(0)
    vm_stats, vcpu_stats = vm.open_stats(), vcpu.open_stats()
    dev = vm.create_device(abi.DeviceType.VFIO)
    assert len(_kvm_fds()) >= len(before) + 4
    vm.close()
    assert vm_stats.closed and vcpu_stats.closed and dev.closed and vcpu.closed
    # their fds, and the VM's, are closed (garbage from earlier tests may go meanwhile)
    assert _kvm_fds() <= before - {f"{vm._fd}:anon_inode:kvm-vm"}
    with pytest.raises(StaleHandleError):
        vcpu_stats.read()


# ---- 4. values checked against the C types they go into --------------------------------

@pytest.mark.parametrize("call, names", [
    (lambda vm: vm.add_memory(2**64, 0x1000), ("guest_phys_addr", "__u64")),
    (lambda vm: vm.add_memory(-0x1000, 0x1000), ("guest_phys_addr", "__u64")),
    (lambda vm: vm.add_memory(0x100000, 2**64), ("size", "memory_size", "__u64")),
    (lambda vm: vm.create_vcpu(2**64 + 1), ("vcpu_id",)),
    (lambda vm: vm.create_vcpu(-1), ("vcpu_id",)),
    (lambda vm: vm.set_tss_addr(2**64 + 0xFFFBD000), ("addr",)),
    (lambda vm: vm.create_vcpu(0).set_msrs({0xC0000103: 2**70}), ("MSR 0xc0000103", "__u64")),
    (lambda vm: vm.create_vcpu(0).get_msrs([2**32]), ("MSR index", "__u32")),
    (lambda vm: vm.set_irq_line(2**32, 1), ("irq", "__u32")),
    (lambda vm: vm.add_irqfd(-1, 5), ("eventfd", "kvm_irqfd.fd", "__u32")),
    (lambda vm: vm.add_ioeventfd(3, 0x1000, 2**32), ("length", "kvm_ioeventfd.len", "__u32")),
    (lambda vm: vm.enable_cap(abi.Capability.X86_DISABLE_EXITS, 2**64), ("args[0]", "__u64")),
    (lambda vm: vm.create_vcpu(0).inject_interrupt(2**32), ("vector", "kvm_interrupt.irq")),
    (lambda vm: vm.create_vcpu(0).set_tsc_khz(2**32 + 1), ("khz", "__u32")),
    (lambda vm: vm.signal_msi(2**64, 0), ("address", "__u64")),
    (lambda vm: vm.memory.write_int(0, 1, 0x1FF), ("0x1ff", "1 bytes")),
], ids=lambda v: v[0] if isinstance(v, tuple) else None)
def test_out_of_range_integers_are_refused_naming_parameter_and_type(vm, call, names):
    with pytest.raises(OverflowError) as err:
        call(vm)
    for name in names:
        assert name in str(err.value)
    assert vm.memory.regions[0].guest_phys_addr == 0 and len(vm.memory.regions) == 1


def test_a_vcpu_id_beyond_the_kernels_limit_is_a_value_error_naming_it(vm):
    limit = vm.check_extension(abi.Capability.MAX_VCPU_ID)
    with pytest.raises(ValueError, match="KVM_CAP_MAX_VCPU_ID"):
        vm.create_vcpu(limit)
    assert vm.create_vcpu(limit - 1).id == limit - 1       # the last valid id works


@pytest.mark.parametrize("value", [1.0, "1", None, b"\x01"])
def test_non_integers_are_type_errors(vm, value):
    with pytest.raises(TypeError, match="must be an integer"):
        vm.add_memory(value, 0x1000)
    with pytest.raises(TypeError, match="must be an integer"):
        vm.create_vcpu(value)


def test_setters_accept_only_their_own_struct(vm):
    vcpu = vm.create_vcpu(0)
    with pytest.raises(TypeError, match="set_regs.. takes a kvm_regs, not kvm_sregs"):
        vcpu.set_regs(vcpu.get_sregs())
    with pytest.raises(TypeError, match="kvm_sregs"):
        vcpu.set_sregs(abi.kvm_regs())
    with pytest.raises(TypeError):
        vcpu.set_lapic(bytearray(1024))
    with pytest.raises(TypeError):
        vm.set_clock(abi.kvm_pit_state2())
    assert vcpu.get_regs().rip == 0xFFF0          # nothing reached the vCPU


def test_flexible_structs_claiming_more_entries_than_they_hold_are_refused(vm):
    vcpu = vm.create_vcpu(0)
    cpuid = abi.kvm_cpuid2.alloc(2)
    cpuid.nent = 100
    with pytest.raises(ValueError, match="claims more entries"):
        vcpu.set_cpuid2(cpuid)
    state = abi.kvm_nested_state()
    state.size = 0x10000
    if vm.check_extension(abi.Capability.NESTED_STATE):
        with pytest.raises(ValueError, match="state.size"):
            vcpu.set_nested_state(state)


def test_one_reg_buffers_are_sized_from_the_register_id(vm):
    """KVM writes as many bytes as the id's size field says; an 8-byte buffer for a 2048-bit
    register would be overrun."""
    vcpu = vm.create_vcpu(0)
    for size_field, nbytes in ((abi.KVM_REG_SIZE_U8, 1), (abi.KVM_REG_SIZE_U64, 8),
                               (abi.KVM_REG_SIZE_U128, 16), (abi.KVM_REG_SIZE_U2048, 256)):
        _, buf = vcpu._one_reg(abi.KVM_REG_X86 | size_field | 0x1234)
        assert len(buf) == nbytes
    with pytest.raises(OverflowError, match="64 bits wide"):
        vcpu.set_one_reg(abi.KVM_REG_X86 | abi.KVM_REG_SIZE_U64, 2**64)


# ---- 6. exit lifetime -------------------------------------------------------------------

def test_held_exits_keep_their_own_data(vm, real_mode, assemble):
    """Three held port writes once all read the last exit's byte."""
    vcpu = real_mode("port_io")
    vcpu.run()                                              # 'H' to 0x3f8
    e = vcpu.run()                                          # the IN
    e.data[0] = 0
    vcpu.run()
    writes = []
    while len(writes) < 3:
        x = vcpu.run()
        assert isinstance(x, IoExit) and x.is_write
        writes.append(x)
    assert [bytes(w.data) for w in writes] == [b"h", b"e", b"l"]   # rep outsb of "hello, kvm"


def test_an_answer_after_the_next_run_is_refused_and_reaches_nothing(vm, real_mode):
    vcpu = real_mode("port_io")
    vcpu.run()
    inp = vcpu.run()
    held = inp.data
    held[0] = 0x5A
    echo = vcpu.run()                                       # the answer went in here
    assert bytes(echo.data) == b"\x5a"
    with pytest.raises(StaleExitError, match="stale"):
        inp.data[0] = 0x11
    with pytest.raises(ValueError):                         # the view handed out is retired
        held[0] = 0x11
    assert bytes(echo.data) == b"\x5a"


def test_reply_after_the_next_run_is_refused(vm, protected_mode):
    vm.enable_cap(abi.Capability.X86_USER_SPACE_MSR, abi.KVM_MSR_EXIT_REASON_UNKNOWN)
    vcpu = protected_mode("msr")
    w = vcpu.run()
    w.reply()
    r = vcpu.run()                                          # the RDMSR: pending
    page_before = bytes(vcpu._page[:4096])
    with pytest.raises(StaleExitError, match="reply"):
        w.reply(error=True)
    assert bytes(vcpu._page[:4096]) == page_before          # nothing was written
    r.reply(0x1122)
    assert bytes(vcpu.run().data) == (0x1122).to_bytes(4, "little")


def test_replies_are_range_checked_against_the_member_types(vm, protected_mode):
    vm.enable_cap(abi.Capability.X86_USER_SPACE_MSR, abi.KVM_MSR_EXIT_REASON_UNKNOWN)
    vcpu = protected_mode("msr")
    vcpu.run().reply()
    r = vcpu.run()
    with pytest.raises(OverflowError, match="data"):
        r.reply(2**64)
    r.reply(5)                                              # still answerable
    assert bytes(vcpu.run().data) == (5).to_bytes(4, "little")


def test_closing_a_vcpu_makes_its_exits_stale(vm, real_mode):
    vcpu = real_mode("port_io")
    out = vcpu.run()
    inp = vcpu.run()
    vcpu.close()
    assert bytes(out.data) == b"H"                          # a snapshot stays readable
    for use in (lambda d: d[0], lambda d: d.__setitem__(0, 1), bytes, len, lambda d: d.tobytes()):
        with pytest.raises(StaleExitError):                 # the answer went nowhere
            use(inp.data)
    assert "<stale>" in repr(inp)
    with pytest.raises(StaleHandleError):
        vcpu.kvm_run                                        # noqa: B018
    with pytest.raises(StaleHandleError):
        vcpu.kick()


# ---- 5. threads (more in test_reliability.py) ---------------------------------------------

def test_a_failed_kick_leaves_no_immediate_exit(real_mode, monkeypatch):
    vcpu = real_mode("spin")
    vcpu._runner = 12345           # as if another thread were in KVM_RUN

    def fail(thread, sig):
        raise OSError(errno.EPERM, "injected")
    monkeypatch.setattr(signal, "pthread_kill", fail)
    with pytest.raises(OSError, match="injected"):
        vcpu.kick()
    vcpu._runner = None
    assert not vcpu.immediate_exit


# ---- 9. the smaller items ---------------------------------------------------------------

def test_an_empty_view_is_empty(vm):
    assert bytes(vm.memory.view(0x1000, 0)) == b""
    assert vm.memory.read(0x1000, 0) == b""


def test_a_slot_number_beyond_the_limit_says_so(vm):
    limit = vm.check_extension(abi.Capability.NR_MEMSLOTS)
    with pytest.raises(ValueError, match=f"slot 40000 is out of range.*{limit} memory slots"):
        vm.add_memory(0x100000, 0x1000, slot=40000)
    with pytest.raises(ValueError, match="in use"):
        vm.add_memory(0x100000, 0x1000, slot=0)
    assert vm.add_memory(0x100000, 0x1000, slot=limit - 1).slot == limit - 1


def test_slots_fill_to_the_kernels_limit_and_the_next_add_says_so(kvm):
    with kvm.create_vm() as vm:
        limit = vm.check_extension(abi.Capability.NR_MEMSLOTS)
        for i in range(limit):
            vm.add_memory(i * PAGE_SIZE, PAGE_SIZE)
        with pytest.raises(KvmError, match=f"all {limit} memory slots are in use") as err:
            vm.add_memory(limit * PAGE_SIZE, PAGE_SIZE)
        assert err.value.errno == errno.ENOSPC
        vm.remove_memory(vm.memory.region_at(5 * PAGE_SIZE))
        assert vm.add_memory(limit * PAGE_SIZE, PAGE_SIZE).slot == 5   # the freed number


def test_out_of_fds_at_vcpu_creation_is_clear_and_burns_no_id(kvm):
    result = _in_subprocess("""
        import os, resource
        vm = kvm.create_vm()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        hog = []
        try:
            while True:
                hog.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        for free in (0, 1):        # a vCPU needs two: its fd and the one mmap duplicates
            try:
                vm.create_vcpu(0)
                print(free, "created?!")
            except KvmError as e:
                print(free, e.errno, e)
            os.close(hog.pop())
        vcpu = vm.create_vcpu(0)                         # the same id, now with fds to spare
        print("created", vcpu.id, vcpu.get_regs().rip == 0xFFF0)
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    for line in lines[:2]:
        assert f" {errno.EMFILE} " in line and "nothing was created" in line
    assert lines[-1] == "created 0 True"


def test_a_failed_kvm_run_mapping_keeps_the_vcpu_for_a_retry(vm, monkeypatch):
    from kvm_bindings import vm as vm_module
    real = vm_module.map_run_page

    def fail(fd, size):
        raise OSError(errno.ENOMEM, "injected")
    monkeypatch.setattr(vm_module, "map_run_page", fail)
    with pytest.raises(KvmError, match=r"call create_vcpu\(3\) again"):
        vm.create_vcpu(3)
    monkeypatch.setattr(vm_module, "map_run_page", real)
    vcpu = vm.create_vcpu(3)            # KVM_CREATE_VCPU again would say EEXIST
    assert vcpu.id == 3 and vcpu.get_regs().rip == 0xFFF0


def test_a_held_region_view_outlives_vm_close_safely(kvm):
    vm = kvm.create_vm()
    region = vm.add_memory(0x20000, 0x1000)
    view = region.view()
    slice_view = vm.memory.view(0x20000, 4)
    vm.close()
    view[:4] = b"safe"                       # the mapping lives while the views do...
    assert bytes(slice_view) == b"safe"
    with pytest.raises(StaleHandleError):    # ...but the region is gone as a handle
        region.view()


def test_the_kvm_device_path_must_be_a_kvm_device():
    need(os.path.exists("/dev/kvm"), "no /dev/kvm", REQUIRE_KVM)
    from kvm_bindings import Kvm, KvmUnavailable
    before = _open_fds()
    with pytest.raises(KvmUnavailable, match="not a KVM device"):
        Kvm("/dev/zero")
    assert _open_fds() == before


def test_ctrl_c_during_a_kicked_run_leaves_no_immediate_exit(kvm):
    """A real SIGINT to a process whose main thread is in KVM_RUN, right after a kick: the
    KeyboardInterrupt may surface inside run() or just after it, and either way the next
    run() enters the guest."""
    result = _in_subprocess("""
        import os, signal, threading
        vm = kvm.create_vm()
        vm.set_tss_addr(0xFFFBD000)
        vm.add_memory(0, 0x10000)
        vm.memory.write(0x1000, bytes.fromhex("ff060020ebfa"))   # incw 0x2000; jmp back
        vcpu = vm.create_vcpu(0)
        interrupted = 0
        for _ in range(20):
            x86.setup_real_mode(vcpu, 0x1000)
            def strike():
                while vcpu._runner is None:
                    pass
                vcpu.kick()
                os.kill(os.getpid(), signal.SIGINT)
            t = threading.Thread(target=strike)
            t.start()
            try:
                while True:
                    vcpu.run()
            except KeyboardInterrupt:
                interrupted += 1
            t.join()
            assert not vcpu.immediate_exit
            vm.memory.write_int(0x2000, 2, 0)
            vcpu.set_guest_debug(abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_SINGLESTEP)
            e = vcpu.run()                      # enters the guest: one step, then DEBUG
            vcpu.set_guest_debug(0)
            assert e.reason.name == "DEBUG", e
        print("interrupted", interrupted)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "interrupted 20"


def _vm_calls(vm, region):
    return {
        "add_memory": lambda: vm.add_memory(0x100000, 0x1000),
        "remove_memory": lambda: vm.remove_memory(region),
        "move_memory": lambda: vm.move_memory(region, 0x200000),
        "set_dirty_logging": lambda: vm.set_dirty_logging(region, True),
        "dirty_log": lambda: vm.get_dirty_log(region),
        "create_vcpu": lambda: vm.create_vcpu(1),
        "check_extension": lambda: vm.check_extension(abi.Capability.NR_MEMSLOTS),
        "enable_cap": lambda: vm.enable_cap(abi.Capability.X86_DISABLE_EXITS, 0),
        "set_tss_addr": lambda: vm.set_tss_addr(0xFFFBD000),
        "create_irqchip": lambda: vm.create_irqchip(),
        "irq_line": lambda: vm.set_irq_line(4, 1),
        "get_clock": lambda: vm.get_clock(),
        "ioeventfd": lambda: vm.add_ioeventfd(0, 0x1000, 4),
        "create_device": lambda: vm.create_device(abi.DeviceType.VFIO),
        "has_device_type": lambda: vm.has_device_type(abi.DeviceType.VFIO),
        "create_guest_memfd": lambda: vm.create_guest_memfd(0x1000),
        "stats": lambda: vm.open_stats(),
    }


def test_every_call_on_a_closed_vm_is_refused_and_reaches_no_other_fd(kvm):
    """A closed VM's fd number is reused at once by the next VM: a call that got through
    would land there (a slot of the old VM's memory in the new VM, say)."""
    vm = kvm.create_vm()
    region = vm.add_memory(0, 0x1000, log_dirty=True)
    number = vm.fd
    vm.close()
    with kvm.create_vm() as other:
        assert other.fd == number                  # the same number, now another VM
        for call in _vm_calls(vm, region).values():
            with pytest.raises(StaleHandleError, match="closed|removed"):
                call()
        assert other.memory.regions == ()
        # KVM agrees: slot 0 at GPA 0x100000 is free in the other VM
        assert other.add_memory(0x100000, 0x1000, slot=0).slot == 0
        other.set_tss_addr(0xFFFBD000)


def test_every_call_on_a_closed_vcpu_is_refused(vm):
    vcpu = vm.create_vcpu(0)
    vcpu.close()
    calls = [vcpu.run, vcpu.get_regs, lambda: vcpu.set_regs(abi.kvm_regs()), vcpu.get_sregs,
             vcpu.kick, lambda: vcpu.get_msrs([0x10]), vcpu.get_lapic, vcpu.drain_coalesced_mmio,
             vcpu.open_stats, lambda: vcpu.immediate_exit, lambda: vcpu.kvm_run,
             lambda: vcpu.set_signal_mask(None), lambda: vcpu.enable_cap(0)]
    for call in calls:
        with pytest.raises(StaleHandleError, match="closed"):
            call()


# ---- found by an adversarial pass: each a test now ---------------------------------------

def _kvm_fds() -> set[str]:
    """The process's fds that name a KVM object (anon_inode:kvm-vm, kvm-vcpu:N, ...)."""
    out = set()
    for n in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{n}")
        except OSError:
            continue
        if target.startswith("anon_inode:kvm") or "kvm-gmem" in target:
            out.add(f"{n}:{target}")
    return out


def _maps_of_size(size: int) -> int:
    """How many mappings of exactly `size` bytes the process has (thread stacks and the
    allocator come and go; a guest-memory mapping of an unusual size does not)."""
    count = 0
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            count += hi - lo == size
    return count


def _wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.001)


def _in_other_thread_now(call) -> threading.Thread:
    """Run call in another thread and give it a moment: as if the scheduler switched threads
    at exactly this point. Returns the thread (it may still be blocked, by design)."""
    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(0.2)
    return t


@pytest.mark.parametrize("child", ["vm.stats", "vcpu.stats", "device", "vcpu"])
def test_a_child_made_while_the_vm_closes_closes_with_it(kvm, monkeypatch, child):
    """The VM is closed (in another thread) after KVM made the child's fd and before the
    runtime files it: the child must not escape the close."""
    from kvm_bindings import device, stats
    from kvm_bindings import vcpu as vcpu_module
    vm = kvm.create_vm()
    parent_vcpu = vm.create_vcpu(0)
    cls = {"vm.stats": stats.Stats, "vcpu.stats": stats.Stats, "device": device.Device,
           "vcpu": vcpu_module.Vcpu}[child]
    real_init = cls.__init__
    closers: list[threading.Thread] = []

    def init_then_close(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        if not closers:
            closers.append(_in_other_thread_now(vm.close))
            _wait_until(lambda: vm.closed, "close() started")
    monkeypatch.setattr(cls, "__init__", init_then_close)
    make = {"vm.stats": vm.open_stats, "vcpu.stats": parent_vcpu.open_stats,
            "device": lambda: vm.create_device(abi.DeviceType.VFIO),
            "vcpu": lambda: vm.create_vcpu(1)}[child]
    before = _kvm_fds()
    with pytest.raises(StaleHandleError):
        make()
    closers[0].join(10)
    assert vm.closed and not closers[0].is_alive()
    # with vm still referenced: the VM's and vCPU 0's fds are gone, and nothing new is open
    left = _kvm_fds()
    assert left < before and not any("stats" in f or "vfio" in f or "vcpu:1" in f for f in left)


@pytest.mark.parametrize("at", ["before the slot lock", "holding the slot lock"])
def test_add_memory_interleaved_with_close_leaves_no_slot_behind(kvm, monkeypatch, at):
    """close() lands in the middle of add_memory(): before it takes the VM's slot lock, or
    while it holds it with the memory mapped. Either way: StaleHandleError, no slot, no map."""
    vm = kvm.create_vm()
    hook = "_check_range" if at == "before the slot lock" else "_set_region"
    real = getattr(vm, hook)
    closers: list[threading.Thread] = []

    def close_first(*args, **kwargs):
        if not closers:
            closers.append(_in_other_thread_now(vm.close))
            _wait_until(lambda: vm.closed, "close() started")
        return real(*args, **kwargs)
    monkeypatch.setattr(vm, hook, close_first)
    size = 0x300000          # a size nothing else here maps, so its mappings can be counted
    maps_before = _maps_of_size(size)
    with pytest.raises(StaleHandleError):
        vm.add_memory(0x100000, size)
    closers[0].join(10)
    assert not closers[0].is_alive() and vm.memory.regions == ()
    assert _maps_of_size(size) == maps_before      # the mapping went again


def test_guest_memory_reads_never_see_a_half_added_region(kvm):
    """A write racing add_memory once went to the wrong region: the region lists were
    updated one after the other, and a reader in between paired them wrongly."""
    with kvm.create_vm() as vm:
        vm.add_memory(0, 0x10000)
        b = vm.add_memory(0x20000, 0x10000)
        memory = vm.memory
        outcome: list = []

        def write():
            try:
                memory.write(0x1F000, b"Z" * 16)
                outcome.append("written")
            except GuestMemoryError:
                outcome.append("unbacked")

        class SwitchAfterInsert(list):
            def insert(self, i, value):
                super().insert(i, value)
                outcome.append(_in_other_thread_now(write))    # mid-update
        memory._starts = SwitchAfterInsert(memory._starts)
        c = vm.add_memory(0x10000, 0x10000)
        outcome[0].join(10)
        assert b"Z" not in bytes(b.view())
        assert outcome[1:] == ["written"] and bytes(c.view()[0xF000:0xF010]) == b"Z" * 16


def test_a_pointers_contents_cannot_claim_more_entries_than_exist(vm):
    vcpu = vm.create_vcpu(0)
    small = abi.kvm_cpuid2.alloc(0)
    lying = ctypes.pointer(small).contents
    lying.nent = 10
    with pytest.raises(ValueError, match="claims more entries"):
        vcpu.set_cpuid2(lying)
    assert vcpu.get_cpuid2().nent == 0


def test_a_closed_guest_memfd_is_refused_and_its_slot_still_removable(kvm):
    with kvm.create_vm() as vm:
        if not vm.check_extension(abi.Capability.GUEST_MEMFD):
            need(False, "no guest_memfd on this kernel", False)
        memfd = vm.create_guest_memfd(0x10000)
        region = vm.add_memory(0x100000, 0x10000, guest_memfd=memfd)
        memfd.close()
        other = vm.create_guest_memfd(0x10000)      # likely the same fd number
        with pytest.raises(StaleHandleError, match="closed"):
            vm.move_memory(region, 0x200000)
        assert region in vm.memory.regions and region.guest_phys_addr == 0x100000
        vm.remove_memory(region)                     # deleting needs no guest_memfd
        vm.add_memory(0x100000, 0x10000, guest_memfd=other)   # KVM has no slot there


def test_dirty_ring_racing_close_leaks_nothing(kvm, assemble):
    baseline = _kvm_fds()
    for _ in range(60):
        vm = kvm.create_vm()
        if not (vm.check_extension(abi.Capability.DIRTY_LOG_RING_ACQ_REL)
                or vm.check_extension(abi.Capability.DIRTY_LOG_RING)):
            vm.close()
            need(False, "no dirty ring on this kernel", False)
        vm.enable_dirty_ring(512)
        vcpu = vm.create_vcpu(0)

        outcome: list = []

        def harvest(vcpu=vcpu, outcome=outcome):
            try:
                outcome.append(vcpu.harvest_dirty_ring())
            except BaseException as e:
                outcome.append(e)
        t = threading.Thread(target=harvest, daemon=True)
        t.start()
        vm.close()
        t.join(10)
        assert outcome == [[]] or (len(outcome) == 1 and type(outcome[0]) is StaleHandleError), \
            outcome
        gc.collect()
        assert _kvm_fds() == baseline


def test_a_held_kvm_run_view_keeps_the_page_only_while_held(kvm):
    baseline = _kvm_fds()
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    run = vcpu.kvm_run
    vm.close()
    assert run.exit_reason == 0                 # still mapped: reading it is safe
    assert _kvm_fds() != baseline               # ...which takes the mmap's fd
    del run
    gc.collect()
    assert _kvm_fds() == baseline               # and both go with the view
    assert vm.closed                            # (the Vm object itself still exists)


def test_reply_while_the_vcpu_runs_in_another_thread_is_refused(vm, protected_mode):
    vm.enable_cap(abi.Capability.X86_USER_SPACE_MSR, abi.KVM_MSR_EXIT_REASON_UNKNOWN)
    vcpu = protected_mode("msr")
    w = vcpu.run()
    del vcpu._gate[0]                           # as if another thread were inside run()
    try:
        page_before = bytes(vcpu._page[:4096])
        with pytest.raises(StaleExitError, match="running again"):
            w.reply()
        assert bytes(vcpu._page[:4096]) == page_before
    finally:
        vcpu._gate.append(None)
    w.reply()                                   # once nothing runs, it is still answerable
    assert vcpu.run().reason.name == "X86_RDMSR"


class _LyingIndex:
    def __index__(self):
        return 2.9


@pytest.mark.parametrize("call", [
    lambda vm: vm.create_vcpu(0).set_mp_state(_LyingIndex()),
    lambda vm: vm.check_extension(1.9),
    lambda vm: vm.kvm.check_extension(True),
    lambda vm: vm.memory.host_address(1.5),
    lambda vm: vm.memory.write_int(0, 4, _LyingIndex()),
    lambda vm: vm.create_vcpu(0).set_msrs(5),
    lambda vm: vm.memory.load(0, 5),
])
def test_odd_arguments_are_type_errors(vm, call):
    with pytest.raises(TypeError):
        call(vm)


@pytest.mark.parametrize("guest", ["counter (signal lands in KVM_RUN)",
                                   "out loop (signal lands in Python code too)"])
def test_close_from_a_signal_handler_inside_run_finishes_without_a_warning(vm, guest):
    # out $0xf8, %al; jmp back: an exit every iteration
    vm.memory.write(0x1000, COUNTER_GUEST if guest.startswith("counter") else bytes.fromhex("e6f8ebfc"))
    vcpu = vm.create_vcpu(0)
    x86.setup_real_mode(vcpu, 0x1000)
    previous = signal.signal(signal.SIGALRM, lambda *a: vcpu.close())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            with pytest.raises(StaleHandleError, match="closed"):
                for _ in range(100_000):
                    vcpu.run()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert vcpu.closed
    with pytest.raises(OSError):
        os.fstat(vcpu._fd)


def test_ctrl_c_during_vm_close_still_deletes_every_slot_and_closes_every_vcpu(kvm):
    result = _in_subprocess("""
        import mmap, os, signal, threading, time
        from kvm_bindings import vcpu as vcpu_module
        vm = kvm.create_vm()
        vm.set_tss_addr(0xFFFBD000)
        vm.add_memory(0, 0x10000)
        vm.memory.write(0x1000, bytes.fromhex("ff060020ebfa"))   # incw 0x2000; jmp back
        stuck, idle = vm.create_vcpu(0), vm.create_vcpu(1)
        x86.setup_real_mode(stuck, 0x1000)
        def body():     # blocks the kick signal: close() can only wait for it
            signal.pthread_sigmask(signal.SIG_BLOCK, {vcpu_module.KICK_SIGNAL})
            try:
                stuck.run()
            except StaleHandleError:
                print("run: closed while it ran", flush=True)
        t = threading.Thread(target=body, daemon=True)
        t.start()
        while vm.memory.read_int(0x2000, 2) == 0:
            time.sleep(0.001)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            vm.close()
        except KeyboardInterrupt:
            print("close interrupted", flush=True)
        print("idle closed:", idle.closed, "regions:", vm.memory.regions, flush=True)
        # The slot is gone, so the spinning guest faults on its next fetch and run() returns.
        t.join(10)
        print("run thread done:", not t.is_alive(), flush=True)
        kvm.close()
        left = [os.readlink(f"/proc/self/fd/{n}") for n in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{n}")]
        print("kvm fds left:", [f for f in left if "kvm" in f])
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()      # the run thread prints when it gets to it
    assert {"close interrupted", "idle closed: True regions: ()", "run: closed while it ran",
            "run thread done: True"} <= set(lines), result.stdout
    assert lines[-1] == "kvm fds left: []"


# ---- Ctrl-C at the worst moments: a KeyboardInterrupt where CPython can raise one ------------

class _InterruptingLock:
    """Stands in for an object's lock; raises KeyboardInterrupt once, as the lock is let go
    when `when()` holds: where a SIGINT that arrived meanwhile would surface in CPython (its
    handler runs after the C call that releases the lock)."""

    def __init__(self, real, when):
        self.real, self.when, self.fired = real, when, False

    def __enter__(self):
        return self.real.__enter__()

    def __exit__(self, *exc):
        self.real.__exit__(*exc)
        if not self.fired and self.when():
            self.fired = True
            raise KeyboardInterrupt


def test_ctrl_c_as_a_call_takes_hold_of_the_fd_does_not_pin_it_open(kvm):
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    fd = vcpu.fd
    vcpu._lock = _InterruptingLock(vcpu._lock, lambda: vcpu._users > 0)
    with pytest.raises(KeyboardInterrupt):
        vcpu.get_regs()
    assert vcpu._lock.fired and vcpu._users == 0
    vm.close()
    with pytest.raises(OSError):
        os.fstat(fd)                                # closed: no count left over kept it


@pytest.mark.parametrize("what", ["vm", "vcpu"])
def test_ctrl_c_right_as_close_starts_leaves_it_for_the_next_close(kvm, what):
    vm = kvm.create_vm()
    vm.add_memory(0, 0x1000)
    vcpu = vm.create_vcpu(0)
    obj = vm if what == "vm" else vcpu
    fd = obj.fd
    obj._lock = _InterruptingLock(obj._lock, lambda: obj._closing and not obj._closed)
    with pytest.raises(KeyboardInterrupt):
        obj.close()
    assert obj.closed                               # refusing every call already...
    with pytest.raises(StaleHandleError):
        obj.fd                                      # noqa: B018
    os.fstat(fd)                                    # ...but not yet released
    obj.close()                                     # the next close finishes the job
    with pytest.raises(OSError):
        os.fstat(fd)
    vm.close()
    assert vm.memory.regions == ()


def test_ctrl_c_as_a_slot_deletion_returns_still_unmaps_its_memory(kvm):
    from kvm_bindings import slots
    vm = kvm.create_vm()
    region = vm.add_memory(0, 0x200000)
    real = vm._raw_ioctl

    def delete_then_ctrl_c(number, ptr, name):
        real(number, ptr, name)                     # KVM deleted the slot...
        vm._raw_ioctl = real
        raise KeyboardInterrupt                     # ...and then the SIGINT surfaced
    vm._raw_ioctl = delete_then_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        vm.close()
    assert vm.closed and region.removed and region not in slots._NEVER_UNMAPPED
    with pytest.raises(OSError):
        os.fstat(vm._fd)


def test_ctrl_c_between_remove_memorys_ioctl_and_its_bookkeeping(vm, monkeypatch):
    from kvm_bindings import slots
    region = vm.add_memory(0x100000, 0x200000)
    real = type(vm)._set_region
    fired: list = []

    def set_then_ctrl_c(self, r, size=None, **kw):
        real(self, r, size=size, **kw)
        if size == 0 and not fired:
            fired.append(True)
            raise KeyboardInterrupt
    monkeypatch.setattr(type(vm), "_set_region", set_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        vm.remove_memory(region)                    # interrupted: the bookkeeping happens first
    assert region.removed and region not in slots._NEVER_UNMAPPED
    assert vm.memory.regions == (vm.memory.regions[0],) and region not in vm.memory.regions
    with pytest.raises(StaleHandleError):
        vm.remove_memory(region)


def test_a_second_close_waits_for_the_first(vm, monkeypatch):
    from kvm_bindings import vcpu as vcpu_module
    monkeypatch.setattr(vcpu_module, "CLOSE_TIMEOUT", 0.5)
    previous = signal.signal(signal.SIGUSR1, lambda *a: None)
    try:
        vcpu, t, result = _start_counting(vm, before_run=lambda: signal.pthread_sigmask(
            signal.SIG_BLOCK, {vcpu_module.KICK_SIGNAL}))
        first = threading.Thread(target=vm.close, daemon=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            first.start()
            _wait_until(lambda: vm.closed, "the first close() started")
            vm.close()                              # returns only once the first is done
            assert not first.is_alive() or first.join(10) is None
            assert vm._closed and vm.memory.regions == ()
            with pytest.raises(OSError):
                os.fstat(vm._fd)
        signal.pthread_kill(t.ident, signal.SIGUSR1)
        t.join(10)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_an_unclosed_vm_is_closed_by_the_collector_even_when_warnings_are_errors(kvm):
    # Under an "error" warning filter (pytest -W error) the ResourceWarning is an exception:
    # the close must still run, or the slot outlives the mapping the collector then unmaps
    # (an adversarial pass had a guest write into memory mapped there afterwards).
    child = _in_subprocess("""
        import gc, os, warnings
        warnings.simplefilter("error")
        from kvm_bindings import Backing, Kvm
        kvm = Kvm()
        vm = kvm.create_vm()
        vcpu = vm.create_vcpu(0)
        backing = Backing.memfd(0x10000)
        vm.add_memory(0, backing=backing)
        vm.add_memory(0x10000, 0x10000)
        def kvm_fds():
            links = []
            for n in os.listdir("/proc/self/fd"):
                try:
                    links.append(os.readlink(f"/proc/self/fd/{n}"))
                except FileNotFoundError:       # the fd listdir itself used
                    pass
            return sorted(link for link in links if "kvm-" in link)
        print("before", kvm_fds())
        del vm, vcpu, backing
        gc.collect()
        print("after", kvm_fds())
    """)
    assert child.returncode == 0, child.stderr
    before, after = child.stdout.splitlines()
    assert "kvm-vm" in before and "kvm-vcpu" in before
    assert after == "after []", child.stdout      # the VM and vCPU fds closed: no slot is left
    assert "ResourceWarning" in child.stderr        # and the user still heard about it
