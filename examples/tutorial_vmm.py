"""A tiny VMM: one vCPU in real mode runs a guest that prints a string and halts.

Run it:  python examples/tutorial_vmm.py   (needs read/write access to /dev/kvm)

docs/tutorial.rst walks through this file; it includes the parts between the
"# [name]" / "# [/name]" markers, so the page shows exactly the code that runs.
"""

from __future__ import annotations

import sys

# [imports]
from kvm_bindings import HltExit, IoExit, Kvm, x86

# [/imports]

# [guest]
# The guest: 16-bit real-mode code, loaded at guest-physical address 0x1000.
# It sends a NUL-terminated string to port 0x3f8 one byte per OUT, then halts.
# Each line is one instruction's machine code; the comment beside it is the
# GNU as source it came from (tests/test_examples.py assembles those comments
# and checks that they give exactly these bytes).
LOAD_ADDR = 0x1000
SERIAL_PORT = 0x3F8
GUEST = b"".join([
    b"\xba\xf8\x03",     # mov $0x3f8, %dx
    b"\xbe\x0f\x10",     # mov $msg, %si
    b"\xac",             # next: lodsb
    b"\x84\xc0",         # test %al, %al
    b"\x74\x03",         # jz done
    b"\xee",             # out %al, (%dx)
    b"\xeb\xf8",         # jmp next
    b"\xf4",             # done: hlt
    b"Hello from the guest!\n\x00",  # msg: .asciz "Hello from the guest!\n"
])
# [/guest]


def main() -> int:
    # [vm]
    with Kvm() as kvm, kvm.create_vm() as vm:
        # On Intel, KVM needs three pages of guest-physical space for the TSS it uses
        # to run real-mode code; put them high, out of the guest's way.
        vm.set_tss_addr(0xFFFBD000)
        vm.add_memory(0, 0x10000)           # 64 KiB of guest RAM at GPA 0
        vm.memory.write(LOAD_ADDR, GUEST)   # copy the program in
        # [/vm]

        # [vcpu]
        vcpu = vm.create_vcpu(0)
        x86.setup_real_mode(vcpu, LOAD_ADDR, stack=0x8000)
        # [/vcpu]

        # [run]
        output = bytearray()
        while True:
            exit = vcpu.run()
            if isinstance(exit, IoExit) and exit.port == SERIAL_PORT and exit.is_write:
                output += exit.data         # the byte(s) the guest sent
            elif isinstance(exit, HltExit):
                break                       # the guest is done
            else:
                print(f"unexpected exit: {exit!r}", file=sys.stderr)
                return 1
        # [/run]

    # [report]
    print(f"guest wrote: {output.decode()!r}")
    return 0
    # [/report]


if __name__ == "__main__":
    sys.exit(main())
