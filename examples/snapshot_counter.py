"""Save a running guest, restore it in a new VM, and reset a VM to the snapshot in place.

Run it:  python examples/snapshot_counter.py   (needs read/write access to /dev/kvm)

The guest counts: it keeps the count in AX and at address 0x2000 and reports each new
value with an OUT to port 0xe9. After three values the VMM saves the VM, lets it go on,
then restores the snapshot in a new VM: the count goes on from 3 there, as it would
have in the original. Loading the snapshot back into that VM (vm.load_state) resets it
to the same point again, the way a fuzzer resets a guest between inputs.
"""

from __future__ import annotations

import sys

from kvm_bindings import IoExit, Kvm, VmState, x86

LOAD_ADDR = 0x1000
PORT = 0xE9
# Real-mode guest at 0x1000. Each line: machine code, and the GNU as source it came
# from (tests/test_examples.py assembles the comments and checks these bytes).
GUEST = b"".join([
    b"\x31\xc0",         # xor %ax, %ax
    b"\x40",             # next: inc %ax
    b"\xa3\x00\x20",     # mov %ax, 0x2000
    b"\xe7\xe9",         # out %ax, $0xe9
    b"\xeb\xf8",         # jmp next
])


def take(vcpu: x86.X86Vcpu, n: int) -> list[int]:
    """The next n values the guest reports."""
    values: list[int] = []
    while len(values) < n:
        exit = vcpu.run()
        if not (isinstance(exit, IoExit) and exit.port == PORT):
            raise RuntimeError(f"unexpected exit: {exit!r}")
        values.append(int.from_bytes(exit.data, "little"))
    return values


def main() -> int:
    with Kvm() as kvm:
        with kvm.create_vm() as vm:
            vm.set_tss_addr(0xFFFBD000)
            vm.add_memory(0, 0x10000)
            vm.memory.write(LOAD_ADDR, GUEST)
            vcpu = vm.create_vcpu(0)
            x86.setup_real_mode(vcpu, LOAD_ADDR)
            first = take(vcpu, 3)
            state = vm.save_state()         # finishes the pending OUT first
            data = state.to_bytes()         # what would go to a file or another host
            later = take(vcpu, 2)
        print(f"ran: {first}, then {later}")
        with kvm.restore_vm(VmState.from_bytes(data)) as vm2:
            print(f"restored in a new VM: {take(vm2.vcpus[0], 3)}")
            vm2.load_state(state)
            print(f"loaded back in place: {take(vm2.vcpus[0], 3)}, "
                  f"count in memory {vm2.memory.read_int(0x2000, 2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
