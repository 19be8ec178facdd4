"""Snapshots on real guests: a guest saved anywhere goes on exactly, in another VM or process.

The oracle is the guest itself: tests/guests/timer_compute.S prints one value per timer
tick, each depending on registers, MSRs, a segment base, memory and the interrupt
controllers and timer; the stream of values of an uninterrupted run is what every
snapshotted, restored, migrated or reset run must print too. A lost register, MSR, page,
PIT or LAPIC state, or a pending OUT completed twice or never, changes or stops it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time

import pytest

from kvm_bindings import (
    Backing,
    InterruptedExit,
    IoExit,
    Kvm,
    VmState,
    x86,
)
from kvm_bindings.abi import x86_64 as abi

from .conftest import LOAD_ADDR, ROOT

PORT = 0xE9
MEMORY = 0x10000
STACK = 0x7000
DEADLINE = 20.0         # seconds without output before a run counts as stalled


def make_vm(kvm, code: bytes):
    """VM A: 64 KiB at 0, in-kernel irqchip and PIT, one long-mode vCPU at the guest."""
    vm = kvm.create_vm()
    try:
        vm.set_tss_addr(0xFFFBD000)
        vm.create_irqchip()
        vm.create_pit2()
        vm.add_memory(0, MEMORY)
        vm.memory.write(LOAD_ADDR, code)
        vcpu = vm.create_vcpu(0)
        # 4 GiB identity-mapped: the LAPIC page at 0xfee00000 too
        x86.setup_long_mode(vcpu, vm.memory, LOAD_ADDR, page_tables=0x8000, gdt_addr=0x500,
                            stack=STACK, identity_gib=4)
    except BaseException:
        vm.close()
        raise
    return vm


def collect(vcpu, n: int) -> list[int]:
    """The next n values the guest prints; fails if it stalls (its timer is gone) or exits
    any other way."""
    out: list[int] = []
    watchdog = threading.Timer(DEADLINE, vcpu.kick)
    watchdog.start()
    try:
        while len(out) < n:
            e = vcpu.run()
            if isinstance(e, InterruptedExit):
                pytest.fail(f"the guest printed nothing for {DEADLINE} s after {len(out)} "
                            f"values: its timer interrupts stopped")
            assert isinstance(e, IoExit) and e.port == PORT and e.size == 4, e
            out.append(int.from_bytes(e.data, "little"))
    finally:
        watchdog.cancel()
    return out


@pytest.fixture(scope="module")
def code(assemble):
    return assemble("timer_compute")


@pytest.fixture(scope="module")
def reference(code):
    """The uninterrupted run's first 400 values."""
    with Kvm() as kvm:
        vm = make_vm(kvm, code)
        with vm:
            values = collect(vm.vcpus[0], 400)
    assert len(set(values)) > 390        # the values really change from step to step
    return values


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


# ---- (a) snapshots at random points, restored in a fresh VM and a fresh process ------------

def test_snapshots_at_random_exits_restore_into_fresh_vms_and_go_on_exactly(kvm, code,
                                                                          reference):
    rng = random.Random(1105)
    points = sorted(rng.sample(range(1, 390), 12))
    vm = make_vm(kvm, code)
    out: list[int] = []
    try:
        for point in points + [400]:
            out += collect(vm.vcpus[0], point - len(out))
            if point == 400:
                break
            # Saved at an OUT exit: the OUT is finished first, never twice.
            data = vm.save_state().to_bytes()
            vm.close()
            vm = kvm.restore_vm(VmState.from_bytes(data))
    finally:
        vm.close()
    assert out == reference


def test_snapshots_at_random_moments_restore_a_halted_vcpu_that_wakes_on_its_timer(
        kvm, code, reference):
    """Kicked at random times, the vCPU is mostly asleep in HLT inside the kernel, with the
    PIT counting and maybe an interrupt pending: all of that is carried over."""
    rng = random.Random(2511)
    vm = make_vm(kvm, code)
    out: list[int] = []
    halted = taken = 0
    try:
        # At least ten snapshots, and on until one caught the vCPU halted (a loaded machine
        # can leave ticks pending, and the vCPU runnable, for a while).
        while (taken < 10 or not halted) and len(out) < 350:
            taken += 1
            vcpu = vm.vcpus[0]
            kicker = threading.Timer(rng.uniform(0.0005, 0.005), vcpu.kick)
            kicker.start()
            while True:
                e = vcpu.run()
                if isinstance(e, InterruptedExit):
                    break
                out.append(int.from_bytes(e.data, "little"))
            kicker.join()
            halted += vcpu.get_mp_state() == abi.MpState.HALTED
            data = vm.save_state().to_bytes()
            vm.close()
            vm = kvm.restore_vm(VmState.from_bytes(data))
        out += collect(vm.vcpus[0], 400 - len(out))
    finally:
        vm.close()
    assert out == reference
    assert halted > 0, "no snapshot was taken with the vCPU halted: the test missed its point"


_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[3])
from kvm_bindings import Kvm, VmState
from tests.test_snapshot import collect
with Kvm() as kvm:
    state = VmState.read(sys.argv[1])
    with kvm.restore_vm(state) as vm:
        print(json.dumps(collect(vm.vcpus[0], int(sys.argv[2]))))
"""


def test_a_snapshot_file_restores_in_a_fresh_process(kvm, code, reference, tmp_path):
    rng = random.Random(77)
    point = rng.randrange(50, 300)
    with make_vm(kvm, code) as vm:
        head = collect(vm.vcpus[0], point)
        vm.save_state().write(tmp_path / "guest.snap")
    child = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "guest.snap"),
                            str(400 - point), str(ROOT)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert head + json.loads(child.stdout) == reference


@pytest.mark.parametrize("map_memory", [False, True])
def test_memory_in_a_separate_file_is_read_or_mapped_copy_on_write(kvm, code, reference,
                                                                   tmp_path, map_memory):
    with make_vm(kvm, code) as vm:
        head = collect(vm.vcpus[0], 100)
        vm.save_state().write(tmp_path / "s.snap", memory_path=tmp_path / "s.mem")
    assert os.path.getsize(tmp_path / "s.snap") < MEMORY      # the memory went elsewhere
    saved = (tmp_path / "s.mem").read_bytes()
    state = VmState.read(tmp_path / "s.snap", map_memory=map_memory)
    with kvm.restore_vm(state) as vm2:
        region = vm2.memory.regions[0]
        assert region.backing.kind == ("private file" if map_memory else "anonymous")
        assert head + collect(vm2.vcpus[0], 300) == reference
        # A later snapshot to the same files replaces them (rename): the restored VM's
        # mapping keeps the old file, its pages are never cut from under it.
        vm2.save_state().write(tmp_path / "s.snap", memory_path=tmp_path / "s.mem")
        assert collect(vm2.vcpus[0], 1)
    if map_memory:
        assert (tmp_path / "s.mem").read_bytes() != saved     # the second snapshot's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.mem", "s.snap"]   # no temp files


# ---- (b) live migration: pre-copy with the dirty log while A runs -------------------------

def test_live_migration_pre_copies_dirty_pages_while_the_guest_runs(kvm, code, reference):
    vm_a = make_vm(kvm, code)
    try:
        (region,) = vm_a.memory.regions
        vm_a.set_dirty_logging(region, True)
        vcpu = vm_a.vcpus[0]
        out: list[int] = []
        stop = threading.Event()

        def run_a() -> None:
            while not stop.is_set():
                e = vcpu.run()
                if isinstance(e, IoExit):
                    out.append(int.from_bytes(e.data, "little"))

        target = Backing.memfd(MEMORY)
        dest = target.view()
        vm_a.get_dirty_log(region)              # start the log now: everything is copied below
        thread = threading.Thread(target=run_a)
        thread.start()
        copied_while_running = 0
        try:
            dest[:] = region.view()             # round 0: all of it, while A runs
            rounds, give_up = 0, time.monotonic() + DEADLINE
            # Rounds 1..: what A wrote meanwhile; at least five, and until A has really run
            # during them (a loaded machine may not schedule it at once).
            while rounds < 5 or not (out and copied_while_running):
                assert time.monotonic() < give_up, "A never ran during the pre-copy"
                time.sleep(0.01)
                rounds += 1
                for gpa, pages in vm_a.get_dirty_log(region).runs():
                    dest[gpa:gpa + pages * 4096] = region.view()[gpa:gpa + pages * 4096]
                    copied_while_running += pages
        finally:
            stop.set()
            while thread.is_alive():
                vcpu.kick()
                thread.join(0.01)
        ran_during_copy = len(out)
        # A is stopped: the last dirty pages, then the state without memory.
        for gpa, pages in vm_a.get_dirty_log(region).runs():
            dest[gpa:gpa + pages * 4096] = region.view()[gpa:gpa + pages * 4096]
        state = vm_a.save_state(memory=False)
        assert state.memory[0].data is None
        blob = state.to_bytes()
    finally:
        vm_a.close()
    assert copied_while_running > 0 and ran_during_copy > 0, "nothing ran during the pre-copy"
    assert len(blob) < MEMORY
    with kvm.restore_vm(VmState.from_bytes(blob), memory={0: target}) as vm_b:
        out += collect(vm_b.vcpus[0], 400 - len(out)) if len(out) < 400 else []
    del dest
    target.close()
    assert out[:400] == reference[:len(out[:400])]
    assert len(out) >= 400


# ---- (c) a fuzzer's reset loop ------------------------------------------------------------

def test_a_thousand_restores_of_one_snapshot_each_run_identically(kvm, code, reference):
    with make_vm(kvm, code) as vm:
        collect(vm.vcpus[0], 50)
        state = VmState.from_bytes(vm.save_state().to_bytes())
    before = _open_fds()
    runs = set()
    for _ in range(1000):
        with kvm.restore_vm(state) as vm2:
            runs.add(tuple(collect(vm2.vcpus[0], 3)))
    assert runs == {tuple(reference[50:53])}
    assert _open_fds() == before


def test_a_thousand_in_place_loads_of_one_snapshot_each_run_identically(kvm, code, reference):
    """load_state(): the fuzzer's reset without a new VM. Each run writes memory and MSRs and
    moves the PIT and LAPIC timers on; every load puts all of that back."""
    with make_vm(kvm, code) as vm:
        collect(vm.vcpus[0], 50)
        state = vm.save_state()
        before = _open_fds()
        runs = set()
        for i in range(1000):
            vm.load_state(state)
            runs.add(tuple(collect(vm.vcpus[0], 3 + i % 3)[:3]))
        assert _open_fds() == before
    assert runs == {tuple(reference[50:53])}


# ---- several vCPUs ------------------------------------------------------------------------

IDS = (0, 3)        # not 0..n-1: ids are kept, not renumbered


def make_smp_vm(kvm, code: bytes):
    vm = kvm.create_vm()
    try:
        vm.set_tss_addr(0xFFFBD000)
        vm.create_irqchip()
        vm.add_memory(0, MEMORY)
        vm.memory.write(LOAD_ADDR, code)
        for i in IDS:
            vcpu = vm.create_vcpu(i)
            x86.setup_long_mode(vcpu, vm.memory, LOAD_ADDR, page_tables=0x8000,
                                gdt_addr=0x500, identity_gib=4)
            # An AP starts waiting for INIT/SIPI; run it straight away instead.
            vcpu.set_mp_state(abi.MpState.RUNNABLE)
    except BaseException:
        vm.close()
        raise
    return vm


def take(vcpu, n: int) -> list[tuple[int, int]]:
    out = []
    for _ in range(n):
        e = vcpu.run()
        assert isinstance(e, IoExit) and e.size == 4, e
        out.append((e.port, int.from_bytes(e.data, "little")))
    return out


def test_several_vcpus_are_saved_apart_and_go_on_each_with_its_own_stream(kvm, assemble):
    code = assemble("two_counters")
    with make_smp_vm(kvm, code) as vm:
        reference = {i: take(vm.vcpus[k], 60) for k, i in enumerate(IDS)}
    assert {p for p, _ in reference[0]} == {0xE9} and {p for p, _ in reference[3]} == {0xEC}
    rng = random.Random(303)
    done = {i: 0 for i in IDS}
    out: dict[int, list[tuple[int, int]]] = {i: [] for i in IDS}
    vm = make_smp_vm(kvm, code)
    try:
        for _ in range(6):
            for k, i in enumerate(IDS):         # each vCPU a different number of steps
                n = rng.randrange(0, 8)
                out[i] += take(vm.vcpus[k], n)
                done[i] += n
            data = vm.save_state().to_bytes()
            vm.close()
            vm = kvm.restore_vm(VmState.from_bytes(data))
            assert tuple(v.id for v in vm.vcpus) == IDS
        for k, i in enumerate(IDS):
            out[i] += take(vm.vcpus[k], 60 - done[i])
    finally:
        vm.close()
    assert out == reference
