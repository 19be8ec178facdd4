"""A device register in guest-physical memory: the guest reads it, the VMM answers.

Run it:  python examples/mmio_device.py   (needs read/write access to /dev/kvm)

Guest RAM covers GPA 0..0x8000 only. An access above it reaches no memory slot, so
KVM stops the vCPU with an MmioExit: for a read the VMM fills exit.data and the
guest receives those bytes when run() is called again; for a write exit.data holds
what the guest wrote. This is how a VMM emulates a device's registers.
"""

from __future__ import annotations

import sys

from kvm_bindings import HltExit, Kvm, MmioExit, x86

LOAD_ADDR = 0x1000
DEVICE_ID = 0xA000      # read-only register: the device's id
DOORBELL = 0xA004       # the guest writes its answer here

# Real-mode guest at 0x1000: read the 16-bit id, add one, write it to the doorbell.
# Each line: machine code, and the GNU as source it came from (tests/test_examples.py
# assembles the comments and checks that they give exactly these bytes).
GUEST = b"".join([
    b"\xa1\x00\xa0",     # mov 0xa000, %ax
    b"\x40",             # inc %ax
    b"\xa3\x04\xa0",     # mov %ax, 0xa004
    b"\xf4",             # hlt
])

REGISTERS = {DEVICE_ID: 0x1234}


def main() -> int:
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.set_tss_addr(0xFFFBD000)         # Intel's real-mode TSS, out of the way
        vm.add_memory(0, 0x8000)            # RAM below 0x8000; the device lives above
        vm.memory.write(LOAD_ADDR, GUEST)
        vcpu = vm.create_vcpu(0)
        x86.setup_real_mode(vcpu, LOAD_ADDR, stack=0x8000)
        while True:
            exit = vcpu.run()
            if isinstance(exit, MmioExit) and not exit.is_write:
                answer = exit.data          # for a read: a writable buffer the guest receives
                assert isinstance(answer, memoryview)
                value = REGISTERS.get(exit.phys_addr, 0)
                answer[:] = value.to_bytes(len(answer), "little")
                print(f"read  {exit.phys_addr:#x} ({len(answer)} bytes) -> {value:#06x}")
            elif isinstance(exit, MmioExit):
                value = int.from_bytes(exit.data, "little")
                print(f"write {exit.phys_addr:#x} ({len(exit.data)} bytes) <- {value:#06x}")
            elif isinstance(exit, HltExit):
                print("guest halted")
                return 0
            else:
                print(f"unexpected exit: {exit!r}", file=sys.stderr)
                return 1


if __name__ == "__main__":
    sys.exit(main())
