/* x87 code in long mode (set up by kvm_bindings.x86): FNINIT, FLDZ, then report on port
 * 0x3f8 and halt. A host whose KVM cannot run x87 in a guest stops at the first of them
 * with an emulation failure instead. */
    .code64
    .globl _start
_start:
    fninit
    fldz
    mov     $0x3f8, %dx
    out     %al, (%dx)              /* exit: the x87 code ran */
    hlt
