/* Protected-mode part of a bzImage that reports where it was entered: the 32-bit
 * entry (offset 0) its EIP, the 64-bit entry (offset 0x200) its RIP. */
    .include "boot_macros.S"
    .code32
    .globl  _start
_start:
    call    1f
1:  pop     %eax                    /* the address of 1: */
    sub     $(1b - _start), %eax
    report32 %eax
    hlt

    .org    0x200
    .code64
startup_64:
    lea     startup_64(%rip), %rax
    report  %rax
    hlt
