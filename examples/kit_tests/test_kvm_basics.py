"""KVM behaviours a kernel maintainer checks first, written with kvm_bindings.testing.

Run with `python -m pytest examples/kit_tests`: the fixtures vm and vcpu come from the
plugin that kvm-bindings registers with pytest (they skip where /dev/kvm is missing).
Each guest reports through the ucall macros (GUEST_SYNC, GUEST_ASSERT_EQ, GUEST_DONE),
so a failure names the guest's file and line.
"""

from __future__ import annotations

from pathlib import Path

from kvm_bindings import Exit, HltExit, IoExit, MmioExit
from kvm_bindings.testing import Print, Sync, assemble, load_guest, run_guest

HERE = Path(__file__).resolve().parent


def test_port_io_round_trip(vcpu):
    """IN gets the byte the host put in the exit's data; OUT gives the host the guest's byte."""
    load_guest(vcpu, assemble("""
        in $0x60, %al           // the host answers 0x41
        xor %ah, %ah
        GUEST_ASSERT_EQ(%ax, $0x41)
        inc %al
        out %al, $0x61          // and sees 0x42
        GUEST_DONE
    """, mode="real"), mode="real")
    written = []

    def device(exit: Exit) -> bool:
        if isinstance(exit, IoExit) and exit.port == 0x60 and not exit.is_write:
            exit.data[0] = 0x41
            return True
        if isinstance(exit, IoExit) and exit.port == 0x61 and exit.is_write:
            written.append(bytes(exit.data))
            return True
        return False

    assert run_guest(vcpu, handler=device) == []
    assert written == [b"\x42"]


def test_mmio_read_and_write_exit_to_the_host(vcpu):
    """Loads and stores where no memory slot is become MMIO exits with the address and width."""
    load_guest(vcpu, assemble("""
        movl 0x10000000, %eax           // MMIO read, 4 bytes: the host answers
        GUEST_ASSERT_EQ(%rax, $0x1234abcd)
        movw $0xbeef, 0x10000008        // MMIO write, 2 bytes
        GUEST_DONE
    """))
    accesses = []

    def device(exit: Exit) -> bool:
        if not isinstance(exit, MmioExit):
            return False
        accesses.append((exit.phys_addr, exit.is_write, bytes(exit.data)))
        if not exit.is_write:
            exit.data[:] = (0x1234ABCD).to_bytes(4, "little")
        return True

    run_guest(vcpu, handler=device)
    assert accesses == [(0x10000000, False, bytes(4)), (0x10000008, True, b"\xef\xbe")]


def test_hlt_exits_to_the_host_and_the_guest_resumes_after_it(vcpu):
    load_guest(vcpu, assemble("""
        GUEST_SYNC($1)
        hlt
        GUEST_SYNC($2)
        GUEST_DONE
    """))
    halts = []
    events = run_guest(vcpu, handler=lambda exit: isinstance(exit, HltExit) and not halts.append(exit))
    assert [e.value for e in events if isinstance(e, Sync)] == [1, 2]
    assert len(halts) == 1


def test_long_mode_arithmetic(vcpu):
    """64-bit mul, div and shifts give the architecture's results (arithmetic.S checks them)."""
    load_guest(vcpu, assemble(HERE / "arithmetic.S"))
    events = run_guest(vcpu)
    assert [e.value for e in events if isinstance(e, Sync)] == [3628800, 1 << 40]
    assert [e.text for e in events if isinstance(e, Print)] == ["quotient 1099511627, remainder 783"]
