/* An IN from port 0x3f8 on every run, for ever. */
    .code16
    .globl _start
_start:
    mov     $0x3f8, %dx
1:  in      (%dx), %al
    jmp     1b
