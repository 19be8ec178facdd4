/* 64-bit long mode (set up by kvm_bindings.x86): store a 64-bit value the
 * test reads back, report EFER's LMA bit, and halt. */
    .code64
    .globl _start
_start:
    movabs  $0x1122334455667788, %rax
    mov     %rax, 0x6000
    mov     $0xc0000080, %ecx       /* IA32_EFER */
    rdmsr
    mov     $0x3f9, %dx
    outl    %eax, (%dx)             /* exit: OUT 0x3f9, EFER low half */
    hlt
