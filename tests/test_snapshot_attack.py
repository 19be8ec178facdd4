"""Snapshots under attack: what an adversarial pass found, each now a test.

Hostile snapshots are built from a real one with their metadata edited and the checksum
made right again (tests/test_snapshot_state._rewrite), so only the checks past the
checksum stand between them and the kernel. Every one must end in SnapshotError (or its
RestoreError), close whatever it opened, and touch nothing of the caller's.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading

import pytest

from kvm_bindings import Backing, Kvm, SnapshotError, VmState
from kvm_bindings.abi import x86_64 as abi
from kvm_bindings.snapshot import VcpuState

from .test_snapshot import collect, make_vm
from .test_snapshot_state import _rewrite, running_elsewhere

INF = float("inf")


@pytest.fixture(scope="module")
def code(assemble):
    return assemble("timer_compute")


@pytest.fixture(scope="module")
def good(code):
    with Kvm() as kvm, make_vm(kvm, code) as vm:
        collect(vm.vcpus[0], 3)
        return vm.save_state().to_bytes()


def _fds() -> dict[int, str]:
    gc.collect()
    out = {}
    for n in os.listdir("/proc/self/fd"):
        try:
            out[int(n)] = os.readlink(f"/proc/self/fd/{n}")
        except OSError:
            pass
    return out


def _set(path, value):
    def edit(meta):
        target = meta
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


def _setup_call(call):
    return lambda meta: meta["vm"]["values"]["setup"].insert(0, call)


def _msr(entry):
    return lambda meta: meta["vcpus"][0]["values"]["msrs"].append(entry)


V = ["vcpus", 0, "values"]
EDITS = {
    "vm type a string": _set(["vm", "values", "type"], "abc"),
    "vm type 2**70": _set(["vm", "values", "type"], 2**70),
    "vm type unknown": _set(["vm", "values", "type"], 99),
    "setup a string": _set(["vm", "values", "setup"], "abc"),
    "setup entry of three": _setup_call(["set_tss_addr", {"addr": 1}, 3]),
    "setup arguments a list": _setup_call(["set_tss_addr", [1]]),
    "setup argument misnamed": _setup_call(["set_tss_addr", {"nope": 1}]),
    "enable_cap without args": _setup_call(["enable_cap", {"cap": 123}]),
    "enable_cap cap a string": _setup_call(["enable_cap", {"cap": "x", "args": [], "flags": 0}]),
    "enable_cap arg 2**70": _setup_call(["enable_cap", {"cap": 123, "args": [2**70], "flags": 0}]),
    "bytes not hex": _setup_call(["set_msr_filter", {"ranges": [[1, 0, 8, {"bytes": "zz"}]],
                                                     "default_deny": False}]),
    "struct unknown": _setup_call(["set_gsi_routing", {"entries": [{"struct": "nope",
                                                                    "bytes": ""}]}]),
    "coalesced zone huge": _setup_call(["add_coalesced_mmio", {"addr": 2**64 - 4096,
                                                               "size": 2**63, "pio": False}]),
    "vcpu setup call of a VM": lambda m: m["vcpus"][0]["values"]["setup"].append(
        ["create_irqchip", {}]),
    "msr index a string": _msr(["a", 1]),
    "msr value 2**64+5": _msr([0x174, 2**64 + 5]),
    "msr value -1": _msr([0x174, -1]),
    "msr entry of one": _msr([1]),
    "msrs a dict": _set(V + ["msrs"], {"a": 1}),
    "run a list": _set(V + ["run"], [1]),
    "run value a string": _set(V + ["run"], {"request_interrupt_window": "x"}),
    "request_interrupt_window 256": _set(V + ["run"], {"request_interrupt_window": 256}),
    "kvm_valid_regs 2**70": _set(V + ["run"], {"kvm_valid_regs": 2**70}),
    "tsc_khz a string": _set(V + ["tsc_khz"], "abc"),
    "mp_state 2**70": _set(V + ["mp_state"], 2**70),
    "regs missing": lambda m: m["vcpus"][0]["structs"].pop("regs"),
    "cpuid missing": lambda m: m["vcpus"][0]["structs"].pop("cpuid"),
    "clock is a lapic": lambda m: m["vm"]["structs"].__setitem__(
        "clock", m["vcpus"][0]["structs"]["lapic"]),
    "vcpu id -1": _set(["vcpus", 0, "id"], -1),
    "vcpu id 2**40": _set(["vcpus", 0, "id"], 2**40),
    "vcpu ids twice": lambda m: m["vcpus"].append(m["vcpus"][0]),
    "slot -1": _set(["memory", 0, "slot"], -1),
    "slot 2**40": _set(["memory", 0, "slot"], 2**40),
    "gpa 2**64": _set(["memory", 0, "guest_phys_addr"], 2**64),
    "gpa not page-aligned": _set(["memory", 0, "guest_phys_addr"], 0x10),
    "offset Infinity": _set(["memory", 0, "data", "offset"], INF),
    "vcpu id Infinity": _set(["vcpus", 0, "id"], INF),
    "host not an object": _set(["host"], 5),
    "host not an object, layout off": lambda m: (m.__setitem__("host", 5),
                                                 m["layouts"].__setitem__("kvm_regs", "0")),
    "registrations a list": _set(["registrations"], [1]),
    "entries on a fixed struct": _set(["vcpus", 0, "structs", "regs", "entries"], 3),
    "entries 2**20 of cpuid": _set(["vcpus", 0, "structs", "cpuid", "entries"], 2**20),
    "base a number": _set(["base"], 5),
    "id an object": _set(["id"], {"a": 1}),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_a_hostile_snapshot_is_refused_whole(kvm, good, name):
    before = _fds()
    with pytest.raises(SnapshotError):
        state = VmState.from_bytes(_rewrite(good, EDITS[name]))
        kvm.restore_vm(state).close()
    assert _fds() == before


def test_the_unedited_snapshot_restores(kvm, code, good):
    """The edits above are what is refused: the same bytes, rewritten unedited, are not,
    and give back the guest the snapshot came from (saved after 3 values: the 4th and
    5th of an uninterrupted run come next)."""
    with make_vm(kvm, code) as fresh:
        expected = collect(fresh.vcpus[0], 5)[3:]
    with kvm.restore_vm(VmState.from_bytes(_rewrite(good, lambda meta: None))) as vm:
        assert [v.id for v in vm.vcpus] == [0]
        assert collect(vm.vcpus[0], 2) == expected


def test_a_memory_file_named_by_a_number_does_not_touch_that_descriptor(kvm, good):
    victim = os.open("/dev/null", os.O_RDONLY)
    try:
        def edit(meta):
            meta["memory_file"] = victim
            meta["memory"][0]["data"]["file"] = "memory"
        with pytest.raises(SnapshotError, match="memory_path="):
            VmState.from_bytes(_rewrite(good, edit))
        os.fstat(victim)            # still open: open(victim) would have closed it
    finally:
        os.close(victim)


def test_a_fifo_as_memory_file_is_refused_without_blocking(good, tmp_path):
    os.mkfifo(tmp_path / "fifo")

    def edit(meta):
        meta["memory_file"] = str(tmp_path / "fifo")
        meta["memory"][0]["data"]["file"] = "memory"
    result: list[BaseException] = []
    t = threading.Thread(target=lambda: result.append(
        pytest.raises(SnapshotError, VmState.from_bytes, _rewrite(good, edit)).value))
    t.start()
    t.join(10)
    assert not t.is_alive(), "from_bytes blocked opening a FIFO"
    assert "not a regular file" in str(result[0])


def test_a_snapshot_file_cut_after_read_cannot_crash_the_restore(kvm, code, tmp_path):
    with make_vm(kvm, code) as vm:
        collect(vm.vcpus[0], 3)
        vm.save_state().write(tmp_path / "s.snap")
    state = VmState.read(tmp_path / "s.snap")
    os.truncate(tmp_path / "s.snap", 4096)      # a mapped file would SIGBUS the restore
    with kvm.restore_vm(state) as vm2:
        assert len(collect(vm2.vcpus[0], 2)) == 2


def test_reading_snapshots_holds_no_descriptor(kvm, good, tmp_path):
    (tmp_path / "s.snap").write_bytes(good)
    before = _fds()
    states = [VmState.read(tmp_path / "s.snap") for _ in range(20)]
    assert _fds() == before and len(states) == 20


def test_a_struct_bigger_than_its_type_keeps_every_byte(good):
    """kvm_nested_state is a header the kernel follows with `size` bytes of its own (this
    host has no nested state to save, so one is made): all of them go into the bytes."""
    state = VmState.from_bytes(good)
    buf = (ctypes.c_uint8 * 8320)()
    nested = abi.kvm_nested_state.from_buffer(buf)
    nested.size = 8320
    buf[8319] = 0xAB
    state.vcpus = (VcpuState(state.vcpus[0].id, {**state.vcpus[0].structs,
                                                 "nested_state": nested},
                             state.vcpus[0].values),)
    back = VmState.from_bytes(state.to_bytes()).vcpus[0].structs["nested_state"]
    assert back.size == 8320
    assert ctypes.string_at(ctypes.addressof(back), 8320)[-1] == 0xAB


def test_two_backings_over_one_file_are_an_alias_and_refused(kvm, tmp_path):
    (tmp_path / "mem").write_bytes(bytes(0x4000))
    with kvm.create_vm() as vm:
        vm.add_memory(0, backing=Backing.file(tmp_path / "mem"))
        vm.add_memory(0x100000, backing=Backing.file(tmp_path / "mem"))
        with pytest.raises(SnapshotError, match="alias"):
            vm.save_state()


def test_a_closed_vcpu_makes_the_vm_unsavable(kvm, code):
    with make_vm(kvm, code) as vm:
        vm.vcpus[0].close()
        with pytest.raises(SnapshotError, match="vCPU 0 was closed"):
            vm.save_state()


def test_memory_given_for_a_slot_the_snapshot_holds_is_refused(kvm, good):
    state = VmState.from_bytes(good)
    with Backing.memfd(0x10000) as backing:
        with pytest.raises(ValueError, match="holds it too"):
            kvm.restore_vm(state, memory={0: backing})
        with pytest.raises(ValueError, match="does not have"):
            kvm.restore_vm(state, memory={"0": backing})


def test_a_state_that_cannot_be_written_says_so(good):
    state = VmState.from_bytes(good)
    state.values["nan"] = float("nan")
    with pytest.raises(SnapshotError, match="cannot"):
        state.to_bytes()
    state = VmState.from_bytes(good)
    state.structs["junk"] = (ctypes.c_uint8 * 4)()
    with pytest.raises(SnapshotError, match="ABI.s structs"):
        state.to_bytes()


# ---- found by the second pass -----------------------------------------------------------

def test_a_mapped_memory_file_replaced_since_read_is_refused(kvm, code, tmp_path):
    """read(map_memory=True) checked one file; a checkpoint loop writing the same paths
    again replaces it. Restoring must not map the new memory under the old registers."""
    with make_vm(kvm, code) as vm:
        collect(vm.vcpus[0], 3)
        vm.save_state().write(tmp_path / "s.snap", memory_path=tmp_path / "s.mem")
        old = VmState.read(tmp_path / "s.snap", map_memory=True)
        collect(vm.vcpus[0], 3)
        vm.save_state().write(tmp_path / "s.snap", memory_path=tmp_path / "s.mem")
    before = _fds()
    with pytest.raises(SnapshotError, match="changed"):
        kvm.restore_vm(old)
    assert _fds() == before
    kvm.restore_vm(VmState.read(tmp_path / "s.snap", map_memory=True)).close()


def test_after_a_load_an_increment_needs_a_new_base(kvm, code):
    with make_vm(kvm, code) as vm:
        collect(vm.vcpus[0], 3)
        reset = vm.save_state()
        base = vm.save_state(track_dirty=True)
        collect(vm.vcpus[0], 3)
        inc = vm.save_state(base=base)
        vm.load_state(reset)                    # rewrites pages the dirty log never sees
        collect(vm.vcpus[0], 1)
        with pytest.raises(SnapshotError, match="track_dirty"):
            vm.save_state(base=inc)


def test_load_state_refuses_a_slot_read_only_where_the_snapshot_had_it_writable(kvm, code):
    with make_vm(kvm, code) as vm:
        state = vm.save_state()
        vm.set_dirty_logging(vm.memory.regions[0], True)
        vm.load_state(state)                   # dirty logging is the VMM's: not compared
        vm.set_readonly(vm.memory.regions[0], True)
        with pytest.raises(SnapshotError, match="flags"):
            vm.load_state(state)


def test_a_busy_vcpu_refuses_a_load_before_any_other_vcpu_changes(kvm, vm, assemble):
    """vCPU 0 waits at an IN (its completion would move RIP and write AL); vCPU 1 spins in
    another thread. The load is refused, and vCPU 0 is exactly as it was."""
    from kvm_bindings import VcpuBusyError, x86
    vm.memory.write(0x1000, assemble("in_then_out"))
    vm.memory.write(0x2000, assemble("spin", 0x2000))
    first, second = vm.create_vcpu(0), vm.create_vcpu(1)
    x86.setup_real_mode(first, 0x1000)
    x86.setup_real_mode(second, 0x2000)
    state = vm.save_state()
    assert not first.run().is_write            # stopped at the IN
    regs = bytes(first.get_regs())
    with running_elsewhere(second):            # spinning until kicked
        with pytest.raises(VcpuBusyError):
            vm.load_state(state)
        assert bytes(first.get_regs()) == regs
    vm.load_state(state)                       # once it stopped, the load goes through


def test_saves_and_loads_from_several_threads_take_turns_and_never_run_the_guest(kvm, code):
    with make_vm(kvm, code) as vm:
        collect(vm.vcpus[0], 3)                # stopped at an OUT: a completion is due
        state = vm.save_state()
        count = vm.memory.read(0x3004, 4)      # the tick count moves only if the guest runs
        word = vm.memory.read(0x3000, 4)
        errors: list[BaseException] = []

        def work(load: bool) -> None:
            try:
                for _ in range(40):
                    if load:
                        vm.load_state(state)
                    else:
                        vm.save_state(memory=False)
            except BaseException as e:         # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i == 0,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert vm.memory.read(0x3000, 4) == word
        assert vm.memory.read(0x3004, 4) == count


@pytest.mark.parametrize("field, value", [("host", None), ("memory", None), ("vcpus", 5),
                                          ("values", []), ("structs", None),
                                          ("registrations", [])])
def test_a_state_edited_out_of_shape_in_python_is_refused(kvm, good, field, value):
    state = VmState.from_bytes(good)
    setattr(state, field, value)
    before = _fds()
    with pytest.raises(SnapshotError):
        if field == "registrations":
            state.to_bytes()
        else:
            kvm.restore_vm(state)
    assert _fds() == before
