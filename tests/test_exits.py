"""Real guests, real exits: each guest in tests/guests/ runs on /dev/kvm and the
exits it causes are decoded and answered."""

from __future__ import annotations

import sys

import pytest

from kvm_bindings import ExitReason, HltExit, IoExit, MmioExit, ShutdownExit, StaleExitError, abi
from kvm_bindings import vcpu as vcpu_module


def test_port_out_and_in_answered_by_the_handler(real_mode):
    vcpu = real_mode("port_io")
    out = vcpu.run()
    assert isinstance(out, IoExit) and out.reason is ExitReason.IO
    assert (out.port, out.size, out.count, out.is_write, bytes(out.data)) == (0x3F8, 1, 1, True, b"H")
    assert isinstance(out.data, bytes)      # a copy of what the guest wrote: it cannot change

    inp = vcpu.run()
    assert isinstance(inp, IoExit) and not inp.is_write and inp.port == 0x3F8
    inp.data[0] = 0x5A                  # the answer the guest's IN receives

    echo = vcpu.run()
    assert (echo.port, bytes(echo.data)) == (0x3F9, b"\x5a")


def test_rep_outsb_exposes_every_element(real_mode):
    vcpu = real_mode("port_io")
    for _ in range(3):
        e = vcpu.run()
        if e.port == 0x3F8 and not e.is_write:
            e.data[0] = 0
    text = b""
    while True:
        e = vcpu.run()
        if isinstance(e, HltExit):
            break
        assert isinstance(e, IoExit) and e.port == 0x3F8 and e.is_write and e.size == 1
        assert len(e.data) == e.count
        text += bytes(e.data)
    assert text == b"hello, kvm"


def test_mmio_write_read_and_readonly_slot(vm, real_mode):
    ro = vm.add_memory(0x20000, 0x1000, readonly=True)
    vm.memory.write(ro.guest_phys_addr, (0x600DF00D).to_bytes(4, "little"))
    vcpu = real_mode("mmio")

    w = vcpu.run()
    assert isinstance(w, MmioExit) and w.is_write
    assert (w.phys_addr, bytes(w.data)) == (0xD0010, (0xCAFEF00D).to_bytes(4, "little"))

    r = vcpu.run()
    assert isinstance(r, MmioExit) and not r.is_write and (r.phys_addr, len(r.data)) == (0xD0020, 4)
    r.data[:] = (0x12345678).to_bytes(4, "little")

    echo = vcpu.run()
    assert isinstance(echo, IoExit) and bytes(echo.data) == (0x12345678).to_bytes(4, "little")

    rw = vcpu.run()                      # a write to the read-only slot
    assert isinstance(rw, MmioExit) and rw.is_write
    assert (rw.phys_addr, bytes(rw.data)) == (0x20008, (0xBEEF).to_bytes(2, "little"))

    seen = vcpu.run()                    # the read from it needed no exit
    assert bytes(seen.data) == (0x600DF00D).to_bytes(4, "little")
    assert vm.memory.read(0x20008, 2) == b"\0\0"    # the write did not land
    assert isinstance(vcpu.run(), HltExit)


def test_hlt_exits_with_hlt(real_mode):
    e = real_mode("hlt").run()
    assert isinstance(e, HltExit) and e.reason is ExitReason.HLT


def test_triple_fault_is_a_shutdown(protected_mode):
    e = protected_mode("triple_fault").run()
    assert isinstance(e, ShutdownExit) and e.reason is ExitReason.SHUTDOWN


def test_single_step_reports_each_instruction(real_mode):
    vcpu = real_mode("single_step")
    vcpu.set_single_step(True)
    pcs = []
    for _ in range(4):
        e = vcpu.run()
        assert e.reason is ExitReason.DEBUG
        pcs.append(e.arch.pc)
    # nop (1 byte), inc %ax (1), inc %bx (1), nop (1): each step lands on the next
    assert pcs == [0x1001, 0x1002, 0x1003, 0x1004]
    vcpu.set_single_step(False)
    assert isinstance(vcpu.run(), HltExit)


def test_msr_accesses_exit_to_userspace_and_are_answered(vm, protected_mode):
    vm.require(abi.Capability.X86_USER_SPACE_MSR, "MSR exits")
    vm.enable_cap(abi.Capability.X86_USER_SPACE_MSR, abi.KVM_MSR_EXIT_REASON_UNKNOWN)
    vcpu = protected_mode("msr")

    w = vcpu.run()
    assert w.reason is ExitReason.X86_WRMSR
    assert (w.index, w.data) == (0xDEAD, 0x12345678_0BADC0DE)
    w.reply()                             # accept the write

    r = vcpu.run()
    assert r.reason is ExitReason.X86_RDMSR and r.index == 0xDEAD
    for not_a_bool in ("yes", 2, None):           # error= is #GP or not: nothing in between
        with pytest.raises(TypeError, match="error must be True or False"):
            r.reply(0, error=not_a_bool)
    r.reply(0xAABBCCDD_11223344)

    echo = vcpu.run()
    assert bytes(echo.data) == (0x11223344).to_bytes(4, "little")


def test_exit_reason_the_bindings_do_not_know_is_unknown_exit(real_mode):
    from kvm_bindings.exits import UnknownExit
    vcpu = real_mode("hlt")
    e = vcpu._decoder.decode(max(int(r) for r in ExitReason) + 100)
    assert isinstance(e, UnknownExit) and e.reason == max(int(r) for r in ExitReason) + 100
    assert "UnknownExit" in repr(e)
    assert vcpu.run().reason is ExitReason.HLT


@pytest.mark.parametrize("guest", ["port_io", "hlt"])
def test_exit_repr_names_reason_and_fields(real_mode, guest):
    e = real_mode(guest).run()
    assert e.reason.name in repr(e)


def test_msr_filter_sends_a_known_msr_to_userspace(vm, protected_mode):
    vm.enable_cap(abi.Capability.X86_USER_SPACE_MSR, abi.KVM_MSR_EXIT_REASON_FILTER)
    # deny reads of MSR 0x10 (IA32_TIME_STAMP_COUNTER): bitmap bit 0 clear
    vm.set_msr_filter([(abi.KVM_MSR_FILTER_READ, 0x10, 8, b"\x00")])
    vcpu = protected_mode("msr_filter")
    r = vcpu.run()
    assert r.reason is ExitReason.X86_RDMSR and r.index == 0x10
    assert r.msr_reason is abi.MsrExitReason.FILTER      # kvm_run.msr.reason: why it came to us
    r.reply(0x77)
    assert bytes(vcpu.run().data) == (0x77).to_bytes(4, "little")


# ---- what repr() shows: hex where C shows hex, data as bytes, stale buffers as stale ----------

def test_io_exit_repr_shows_the_port_in_hex_and_the_data_as_bytes(real_mode):
    vcpu = real_mode("port_io")
    out = vcpu.run()
    assert repr(out) == "<IoExit IO: port=0x3f8, size=1, count=1, is_write=True, data=b'H'>"
    inp = vcpu.run()
    inp.data[0] = 0x5A
    assert repr(inp) == "<IoExit IO: port=0x3f8, size=1, count=1, is_write=False, data=b'Z'>"
    vcpu.run()
    # the answer buffer went to the guest with that run; the copy of a write stays
    assert repr(inp) == "<IoExit IO: port=0x3f8, size=1, count=1, is_write=False, data=<stale>>"
    assert repr(out) == "<IoExit IO: port=0x3f8, size=1, count=1, is_write=True, data=b'H'>"


def test_mmio_exit_repr_shows_the_address_in_hex(real_mode):
    vcpu = real_mode("mmio")
    w = vcpu.run()
    assert repr(w) == "<MmioExit MMIO: phys_addr=0xd0010, is_write=True, data=b'\\r\\xf0\\xfe\\xca'>"
    r = vcpu.run()
    assert repr(r).startswith("<MmioExit MMIO: phys_addr=0xd0020, is_write=False, data=b'")
    vcpu.close()
    assert repr(r).endswith("data=<stale>>")


def test_simple_exit_repr_is_its_class_and_reason(real_mode):
    assert repr(real_mode("hlt").run()) == "<HltExit HLT>"


def test_msr_exit_repr_names_its_fields_in_hex_and_the_msr_reason(vm, protected_mode):
    vm.require(abi.Capability.X86_USER_SPACE_MSR, "MSR exits")
    vm.enable_cap(abi.Capability.X86_USER_SPACE_MSR, abi.KVM_MSR_EXIT_REASON_UNKNOWN)
    w = protected_mode("msr").run()
    assert repr(w) == ("<X86WrmsrExit X86_WRMSR: error=0, msr_reason=MsrExitReason.UNKNOWN, "
                       "index=0xdead, data=0x123456780badc0de>")


def test_debug_exit_repr_shows_the_nested_arch_fields(real_mode):
    vcpu = real_mode("single_step")
    vcpu.set_single_step(True)
    e = vcpu.run()
    assert repr(e).startswith("<DebugExit DEBUG: arch={exception=1, ") and "pc=0x1001," in repr(e)


def test_an_exit_refuses_copy_and_pickle_naming_itself(real_mode):
    import copy
    import pickle
    out = real_mode("port_io").run()
    for attempt in (lambda: copy.copy(out), lambda: copy.deepcopy(out), lambda: pickle.dumps(out)):
        with pytest.raises(TypeError, match=f"a {type(out).__name__} belongs to one run"):
            attempt()


def test_exits_kept_by_the_caller_never_change_though_run_reuses_the_ones_nobody_holds(real_mode):
    # run() refills an IoExit or MmioExit object that nobody but the vCPU holds any more
    # (CPython's reference count says so) instead of making a new one. Whatever the caller
    # keeps (here every seventh exit, in a list) must stay exactly as it was returned.
    vcpu = real_mode("numbered_exits")
    kept = []           # (exit, what it said when run() returned it)
    reused = 0
    answers = 0
    for i in range(2000):
        spares = {id(vcpu._io_spare), id(vcpu._mmio_spare)}   # both alive while run() runs
        e = vcpu.run()
        reused += id(e) in spares       # the same object as a spare: a new one cannot share its id
        if isinstance(e, HltExit):
            break
        if isinstance(e, IoExit) and not e.is_write:
            e.data[0] = (i * 37) & 0xFF                         # the guest echoes it to 0xd0011
            answer = (i * 37) & 0xFF
            snapshot = (e.reason, e.port, False, None)
        else:
            snapshot = (e.reason, e.port if isinstance(e, IoExit) else e.phys_addr,
                        e.is_write, bytes(e.data))
            if isinstance(e, MmioExit) and e.phys_addr == 0xD0011:
                assert bytes(e.data) == bytes([answer]), "an answer was lost or overwritten"
                answers += 1
        if i % 7 == 0:
            kept.append((e, snapshot))
        del e
    else:
        pytest.fail("the guest did not halt")
    assert answers == 200
    if vcpu_module._refcount is sys.getrefcount:        # CPython before 3.14, with a GIL
        assert reused > 500, f"run() refilled {reused} exits: the reuse attacked here never happened"
    else:
        assert reused == 0
    for e, (reason, where, is_write, data) in kept:
        assert e.reason is reason and e.is_write is is_write
        assert (e.port if isinstance(e, IoExit) else e.phys_addr) == where
        if data is None:                  # an IN: its answer went to the guest, the buffer is gone
            with pytest.raises(StaleExitError):
                e.data[0]                 # noqa: B018
        else:
            assert bytes(e.data) == data, f"a kept {e!r} changed after later runs"
