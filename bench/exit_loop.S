/* The benchmark guest: OUT to port 0x3f8 ecx times (ecx set by the host),
 * then halt. Each OUT is one KVM_EXIT_IO. */
    .code16
    .globl _start
_start:
    mov     $0x3f8, %dx
1:  mov     %cl, %al
    out     %al, (%dx)
    dec     %ecx
    jnz     1b
    hlt
