/* An OUT to port 0x3f8 on every run, for ever. */
    .code16
    .globl _start
_start:
    mov     $0x3f8, %dx
1:  out     %al, (%dx)
    jmp     1b
