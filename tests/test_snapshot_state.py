"""Snapshots, state by state: what the kernel hands back after a restore is what was saved;
pending I/O, busy vCPUs, incremental snapshots, and every way a snapshot can be refused.

The oracle is the kernel: each KVM_GET_* on the restored vCPU or VM is compared with the
same call on the original, never with bytes this library wrote down itself.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from kvm_bindings import (
    InterruptedExit,
    IoExit,
    KvmError,
    PendingExitError,
    RestoreError,
    SnapshotError,
    StaleHandleError,
    VcpuBusyError,
    VmState,
)
from kvm_bindings.abi import x86_64 as abi
from kvm_bindings.snapshot import MAGIC

from .test_reliability import _in_thread, _wait_for
from .test_snapshot import collect, make_vm


@pytest.fixture(scope="module")
def code(assemble):
    return assemble("timer_compute")


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _distinctive(vm) -> None:
    """State the guest does not set itself (this host cannot run x87 or SSE code in a
    guest), put in from the host: x87 and SSE registers, debug registers, a pending NMI.

    The FPU goes in through KVM_SET_XSAVE with the x87 and SSE bits of XSTATE_BV set.
    (KVM_SET_FPU writes the legacy area but leaves XSTATE_BV alone, so on an XSAVE host
    KVM_GET_XSAVE reports those components as in their initial state.)"""
    vcpu = vm.vcpus[0]
    xsave = vcpu.get_xsave2()
    raw = bytearray(ctypes.string_at(ctypes.addressof(xsave), xsave.flex_nbytes))
    for i in range(8):                                  # ST0-ST7: 16 bytes apart from 32
        raw[32 + 16 * i:32 + 16 * i + 10] = bytes(range(i + 1, i + 11))
    for i in range(16):                                 # XMM0-XMM15: from 160
        raw[160 + 16 * i:176 + 16 * i] = bytes((i * 17 + j) & 0xFF for j in range(16))
    raw[512] |= 0b11                                    # XSTATE_BV: x87 and SSE
    ctypes.memmove(ctypes.addressof(xsave), bytes(raw), len(raw))
    vcpu.set_xsave(xsave)
    dbg = vcpu.get_debugregs()
    dbg.db[:] = [0x1000, 0x2000, 0x3000, 0x4000]
    vcpu.set_debugregs(dbg)
    vcpu.inject_nmi()


def _chip_settings(chip) -> dict:
    """An irqchip's state but for what the running PIT changes at each tick (the request
    registers), as plain data."""
    d = abi.to_dict(chip)
    views = d["chip"]
    del views["dummy"]                  # the union's raw view holds those bytes too
    del views["pic"]["irr"], views["pic"]["last_irr"], views["ioapic"]["irr"]
    return d


def _xsave_bytes(vcpu) -> bytes:
    xsave = vcpu.get_xsave2()
    return ctypes.string_at(ctypes.addressof(xsave), xsave.flex_nbytes)


def test_every_saved_struct_reads_back_from_the_restored_vcpu(kvm, code):
    with make_vm(kvm, code) as vm:
        collect(vm.vcpus[0], 20)
        _distinctive(vm)
        vm.vcpus[0].kvm_run.request_interrupt_window = 1     # kvm_run state a VMM set
        state = VmState.from_bytes(vm.save_state().to_bytes())
        old = vm.vcpus[0]
        before = {"regs": bytes(old.get_regs()), "sregs2": bytes(old.get_sregs2()),
                  "xsave": _xsave_bytes(old), "fpu": bytes(old.get_fpu()), "xcrs": bytes(old.get_xcrs()),
                  "debugregs": bytes(old.get_debugregs()), "events": bytes(old.get_vcpu_events()),
                  "mp_state": old.get_mp_state(), "cpuid": state.vcpus[0].structs["cpuid"]}
        msr_list = kvm.get_msr_index_list()
        old_msrs = old.get_msrs(msr_list)
        chips = {c: _chip_settings(vm.get_irqchip(c)) for c in (0, 1, 2)}
    with kvm.restore_vm(state) as vm2:
        new = vm2.vcpus[0]
        assert new.kvm_run.request_interrupt_window == 1
        assert bytes(new.get_regs()) == before["regs"]
        assert bytes(new.get_sregs2()) == before["sregs2"]
        assert _xsave_bytes(new) == before["xsave"]
        assert before["fpu"][:10] == bytes(range(1, 11))         # ST0, as KVM_GET_FPU sees it
        assert bytes(new.get_fpu()) == before["fpu"]
        assert bytes(new.get_xcrs()) == before["xcrs"]
        assert bytes(new.get_debugregs()) == before["debugregs"]
        events = new.get_vcpu_events()
        assert events.nmi.pending == 1                   # the NMI injected above is pending
        assert bytes(events) == before["events"]
        assert new.get_mp_state() == before["mp_state"]
        cpuid = new.get_cpuid2(256)
        assert cpuid.nent == before["cpuid"].nent > 0
        assert bytes(cpuid.flex_array()) == bytes(before["cpuid"].flex_array())
        new_msrs = new.get_msrs(msr_list)
        # The time-stamp counter and what counts with it go on ticking.
        ticking = {0x10, 0xE7, 0xE8, 0x6E0}
        differ = {hex(i) for i in old_msrs if i not in ticking and old_msrs[i] != new_msrs.get(i)}
        assert not differ
        assert new_msrs[0xC0000102] == old_msrs[0xC0000102] != 0    # the guest's counter
        for c, settings in chips.items():
            assert _chip_settings(vm2.get_irqchip(c)) == settings


def test_the_setup_calls_are_made_again_and_eventfd_wiring_is_listed(kvm, code):
    with make_vm(kvm, code) as vm:
        vm.add_coalesced_mmio(0xD0000000, 0x1000)
        io_fd, fd = os.eventfd(0), os.eventfd(0)
        try:
            vm.add_ioeventfd(io_fd, 0x510, 2, datamatch=7, pio=True)
            vm.add_irqfd(fd, 5)
            vm.remove_irqfd(fd, 5)
            vm.add_irqfd(fd, 9)
            state = VmState.from_bytes(vm.save_state().to_bytes())
        finally:
            vm.close()
            os.close(io_fd)
            os.close(fd)
    calls = [c for c, _ in state.values["setup"]]
    assert calls == ["set_tss_addr", "create_irqchip", "create_pit2", "add_coalesced_mmio"]
    assert state.registrations == {
        "irqfd": [{"gsi": 9, "resample": False}],
        "ioeventfd": [{"addr": 0x510, "length": 2, "datamatch": 7, "pio": True}]}
    with kvm.create_vm() as bare:          # the oracle can say no: without the setup calls
        with pytest.raises(KvmError, match="ENXIO|No such device"):
            bare.get_pit2()
        with pytest.raises(KvmError, match="ENXIO|No such device"):
            bare.get_irqchip(abi.KVM_IRQCHIP_IOAPIC)
    with kvm.restore_vm(state) as vm2:
        vm2.get_pit2()                      # the PIT and the irqchip were made again
        vm2.get_irqchip(abi.KVM_IRQCHIP_IOAPIC)
        assert [c for c, _ in vm2.save_state(memory=False).values["setup"]] == calls


# ---- pending exits ------------------------------------------------------------------------

def test_an_answered_in_exit_is_completed_before_saving(kvm, vm, real_mode):
    """in_then_out.S: IN from 0x3f8, then OUT of what it read. Saved at the IN exit with an
    answer given, the restored guest OUTs that answer (KVM wrote it into AL on the
    completing KVM_RUN); without the completion it would ask again."""
    vcpu = real_mode("in_then_out")
    e = vcpu.run()
    assert isinstance(e, IoExit) and not e.is_write
    e.data = b"Q"
    state = vm.save_state()
    with kvm.restore_vm(state) as vm2:
        e = vm2.vcpus[0].run()
        assert isinstance(e, IoExit) and e.is_write and e.data == b"Q"


@contextmanager
def running_elsewhere(vcpu) -> Iterator[None]:
    """For the with block, vcpu runs in another thread (exit after exit, until kicked)."""
    def run() -> None:
        while not isinstance(vcpu.run(), InterruptedExit):
            pass

    t, result = _in_thread(run)
    try:
        _wait_for(lambda: vcpu._runner is not None or not t.is_alive(),
                  "the vCPU thread entered run()")
        assert "error" not in result, result
        yield
    finally:
        vcpu.kick()
        t.join()
    assert "error" not in result, result


def test_a_vcpu_running_in_another_thread_is_refused_and_nothing_is_held(kvm, code):
    with make_vm(kvm, code) as vm:
        with running_elsewhere(vm.vcpus[0]):
            with pytest.raises(VcpuBusyError, match="running in"):
                vm.save_state()
        vm.save_state()     # the gates were all given back


def test_a_closed_vm_is_refused(kvm, code):
    vm = make_vm(kvm, code)
    vm.close()
    with pytest.raises(StaleHandleError):
        vm.save_state()


def test_pending_exit_error_carries_the_exit(kvm, code, monkeypatch):
    """Where the completing run exits again (a string I/O with more to move), the exit is
    handed over, not lost."""
    with make_vm(kvm, code) as vm:
        collect(vm.vcpus[0], 2)
        from kvm_bindings.x86 import snapshot
        monkeypatch.setattr(type(vm.vcpus[0]), "immediate_exit",
                            property(lambda s: False, lambda s, v: None))
        with pytest.raises(PendingExitError) as info:
            snapshot._complete_pending(vm.vcpus[0])
        assert isinstance(info.value.exit, IoExit) and info.value.exit.port == 0xE9


# ---- incremental snapshots ----------------------------------------------------------------

def test_an_incremental_snapshot_holds_only_dirty_pages_and_restores_exactly(kvm, code):
    with make_vm(kvm, code) as vm:
        head = collect(vm.vcpus[0], 30)
        base = vm.save_state(track_dirty=True)
        base_bytes = base.to_bytes()
        head += collect(vm.vcpus[0], 30)
        inc = vm.save_state(base=base)
        inc_bytes = inc.to_bytes()
        head += collect(vm.vcpus[0], 20)
        inc2 = vm.save_state(base=inc)          # a chain: each against the one before
        inc2_bytes = inc2.to_bytes()
        reference = head + collect(vm.vcpus[0], 40)
    pages = sum(len(p) for m in inc.memory for _, p in m.pages)
    assert 0 < pages <= 4 * 4096        # the data page, the stack page: not all 16
    assert len(inc_bytes) < len(base_bytes) - 0x10000 + pages + 4096
    full = VmState.from_bytes(inc_bytes, base=VmState.from_bytes(base_bytes))
    with kvm.restore_vm(full) as vm2:
        assert collect(vm2.vcpus[0], 60) == reference[60:120]
    full2 = VmState.from_bytes(inc2_bytes, base=full)
    with kvm.restore_vm(full2) as vm3:
        assert collect(vm3.vcpus[0], 40) == reference[80:120]


def test_incremental_snapshots_refuse_a_wrong_or_missing_base(kvm, code):
    with make_vm(kvm, code) as vm:
        collect(vm.vcpus[0], 5)
        with pytest.raises(SnapshotError, match="track_dirty"):
            vm.save_state(base=vm.save_state())              # base was not tracking
        base = vm.save_state(track_dirty=True)
        collect(vm.vcpus[0], 5)
        inc = vm.save_state(base=base)
        with pytest.raises(SnapshotError, match="latest"):
            vm.save_state(base=base)                         # inc took those pages already
        vm.get_dirty_log(vm.memory.regions[0])               # someone else reads the log
        with pytest.raises(SnapshotError, match="dirty log"):
            vm.save_state(base=inc)
        data = inc.to_bytes()
    with pytest.raises(SnapshotError, match="incremental: pass base="):
        VmState.from_bytes(data)
    other = VmState.from_bytes(base.to_bytes())
    other.id = "0" * 32
    with pytest.raises(SnapshotError, match="taken against"):
        VmState.from_bytes(data, base=other)
    with pytest.raises(SnapshotError, match="incremental"):
        kvm.restore_vm(inc)


# ---- refused input ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def snapshot_bytes(code):
    from kvm_bindings import Kvm
    with Kvm() as kvm, make_vm(kvm, code) as vm:
        collect(vm.vcpus[0], 5)
        return vm.save_state().to_bytes()


def _rewrite(data: bytes, edit) -> bytes:
    """The snapshot with its metadata edited and its checksum made right again: what only
    the checks past the checksum can catch."""
    _, _, _, meta_len, payload_len, _ = struct.unpack_from("<8sIIQQ32s", data)
    meta = json.loads(data[64:64 + meta_len])
    edit(meta)
    text = json.dumps(meta).encode()
    start_old = (64 + meta_len + 4095) // 4096 * 4096
    head = struct.pack("<8sIIQQ32s", MAGIC, 1, 64, len(text), payload_len,
                       hashlib.sha256(text).digest())
    pad = (64 + len(text) + 4095) // 4096 * 4096 - 64 - len(text)
    return head + text + bytes(pad) + data[start_old:]


def test_every_truncation_is_refused_clearly(snapshot_bytes):
    rng = random.Random(5)
    cuts = {0, 1, 7, 63, 64, 100, len(snapshot_bytes) - 1} | {
        rng.randrange(len(snapshot_bytes)) for _ in range(60)}
    for cut in sorted(cuts):
        with pytest.raises(SnapshotError):
            VmState.from_bytes(snapshot_bytes[:cut])


def test_every_flipped_byte_is_refused_clearly(snapshot_bytes):
    """Anywhere in header, metadata or blobs (padding aside, which means nothing)."""
    rng = random.Random(6)
    _, _, _, meta_len, payload_len, _ = struct.unpack_from("<8sIIQQ32s", snapshot_bytes)
    state = VmState.from_bytes(snapshot_bytes)
    start = (64 + meta_len + 4095) // 4096 * 4096
    meaningful = list(range(64 + meta_len))
    assert state.vcpus
    meta = json.loads(snapshot_bytes[64:64 + meta_len])
    refs = [r for v in meta["vcpus"] for r in v["structs"].values()]
    refs += list(meta["vm"]["structs"].values()) + [m["data"] for m in meta["memory"]]
    for r in refs:
        meaningful += range(start + r["offset"], start + r["offset"] + r["size"])
    for at in rng.sample(meaningful, 150):
        bad = bytearray(snapshot_bytes)
        bad[at] ^= 1 << rng.randrange(8)
        with pytest.raises(SnapshotError):
            VmState.from_bytes(bytes(bad))


def test_not_a_snapshot_and_other_versions_are_refused(snapshot_bytes, tmp_path):
    with pytest.raises(SnapshotError, match="magic"):
        VmState.from_bytes(b"\x7fELF" + bytes(100))
    newer = bytearray(snapshot_bytes)
    newer[8] = 2
    with pytest.raises(SnapshotError, match="format version 2"):
        VmState.from_bytes(bytes(newer))
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(SnapshotError, match="empty"):
        VmState.read(tmp_path / "empty")


def test_other_layouts_or_arch_are_refused_naming_them(snapshot_bytes):
    def layout(meta):
        meta["layouts"]["kvm_regs"] = "0" * 32
    with pytest.raises(SnapshotError, match="kvm_regs.*laid out differently"):
        VmState.from_bytes(_rewrite(snapshot_bytes, layout))

    def arch(meta):
        meta["arch"] = "arm64"
    with pytest.raises(SnapshotError, match="arm64"):
        VmState.from_bytes(_rewrite(snapshot_bytes, arch))

    def unknown(meta):
        meta["arch"] = "sparc"
    with pytest.raises(SnapshotError, match="sparc"):
        VmState.from_bytes(_rewrite(snapshot_bytes, unknown))


def test_a_snapshot_naming_a_call_outside_the_setup_list_is_refused(kvm, snapshot_bytes):
    def evil(meta):
        meta["vm"]["values"]["setup"].insert(0, ["close", {}])
    state = VmState.from_bytes(_rewrite(snapshot_bytes, evil))
    before = _open_fds()
    with pytest.raises(SnapshotError, match="'close' is not a setup call"):
        kvm.restore_vm(state)
    assert _open_fds() == before


def test_another_cpu_vendor_is_refused_unless_asked(kvm, snapshot_bytes):
    def vendor(meta):
        meta["host"]["cpu_vendor"] = "GenuineIntel" if "AMD" in meta["host"].get(
            "cpu_vendor", "") else "AuthenticAMD"
    state = VmState.from_bytes(_rewrite(snapshot_bytes, vendor))
    with pytest.raises(SnapshotError, match="check_cpu=False"):
        kvm.restore_vm(state)
    kvm.restore_vm(state, check_cpu=False).close()


def test_a_refused_restore_closes_the_half_made_vm_and_names_the_step(kvm, snapshot_bytes):
    def bad_msr(meta):
        meta["vcpus"][0]["values"]["msrs"].append([0x12345678, 1])
    state = VmState.from_bytes(_rewrite(snapshot_bytes, bad_msr))
    before = _open_fds()
    with pytest.raises(RestoreError, match=r"vcpu 0: KVM_SET_MSRS.*0x12345678") as info:
        kvm.restore_vm(state)
    assert info.value.step == "vcpu 0: KVM_SET_MSRS"
    assert _open_fds() == before


def test_load_state_refuses_a_vm_of_another_shape_before_changing_anything(kvm, code):
    with make_vm(kvm, code) as vm:
        collect(vm.vcpus[0], 5)
        state = vm.save_state()
        with make_vm(kvm, code) as other:
            other.add_memory(0x100000, 0x1000)
            regs = bytes(other.vcpus[0].get_regs())
            memory = other.memory.read(0, 0x10000)
            with pytest.raises(SnapshotError, match="memory slots"):
                other.load_state(state)
            assert bytes(other.vcpus[0].get_regs()) == regs
            assert other.memory.read(0, 0x10000) == memory
        with kvm.create_vm() as bare:
            bare.add_memory(0, 0x10000)
            with pytest.raises(SnapshotError, match="setup calls"):
                bare.load_state(state)


def test_load_state_finishes_a_pending_in_before_overwriting_it(vm, real_mode):
    """Stopped at an IN, with KVM waiting to write the answer into AL on the next run: the
    load must not let that write land on the loaded registers."""
    vcpu = real_mode("in_then_out")
    state = vm.save_state()                  # before the IN
    e = vcpu.run()
    assert isinstance(e, IoExit) and not e.is_write
    e.data = b"Z"                            # an answer that must not reach the guest
    vm.load_state(state)
    e = vcpu.run()
    assert isinstance(e, IoExit) and not e.is_write     # the IN again, from the start
    e.data = b"A"
    e = vcpu.run()
    assert e.is_write and e.data == b"A"


def test_the_clock_goes_on_from_where_it_stopped_or_by_the_time_since(kvm, vm, real_mode):
    """The oracle is KVM_GET_CLOCK on the restored VM, against the saved value and the
    wall-clock time between the save and the restore."""
    real_mode("hlt")
    state = vm.save_state()
    saved = state.structs["clock"].clock
    time.sleep(0.3)
    with kvm.restore_vm(state) as still:
        assert saved <= still.get_clock().clock < saved + 100_000_000
    with kvm.restore_vm(state, advance_clock=True) as moved:
        assert moved.get_clock().clock >= saved + 300_000_000
