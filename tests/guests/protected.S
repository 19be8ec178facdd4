/* 32-bit protected mode (set up by kvm_bindings.x86): report CR0 and write a
 * marker above 1 MiB, which real mode cannot reach. */
    .code32
    .globl _start
_start:
    mov     %cr0, %eax
    mov     $0x3f9, %dx
    outl    %eax, (%dx)             /* exit: OUT 0x3f9, CR0 (PE set) */
    movl    $0x32323232, 0x100000
    hlt
