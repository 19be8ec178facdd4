/* Four one-byte instructions, then halt: single-stepping sees each. */
    .code16
    .globl _start
_start:
    nop
    inc     %ax
    inc     %bx
    nop
    hlt
