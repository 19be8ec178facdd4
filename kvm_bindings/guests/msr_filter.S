/* Read the TSC through RDMSR (MSR 0x10), in 32-bit protected mode: KVM handles
 * it itself unless an MSR filter sends it to userspace. */
    .code32
    .globl _start
_start:
    mov     $0x10, %ecx
    rdmsr                           /* exit: X86_RDMSR when filtered */
    mov     $0x3f9, %dx
    outl    %eax, (%dx)
    hlt
