/* RDMSR and WRMSR of an MSR KVM does not know, in 32-bit protected mode: with
 * KVM_CAP_X86_USER_SPACE_MSR both exit to userspace. The value read is
 * reported on port 0x3f9. */
    .code32
    .globl _start
_start:
    mov     $0x0000dead, %ecx
    mov     $0x0badc0de, %eax
    mov     $0x12345678, %edx
    wrmsr                           /* exit: X86_WRMSR */
    rdmsr                           /* exit: X86_RDMSR, answered by the test */
    mov     $0x3f9, %dx
    outl    %eax, (%dx)             /* exit: OUT 0x3f9, low half of what was read */
    hlt
