/* An IN from port 0x3f8, an OUT of what it read to the same port, then halt. */
    .code16
    .globl _start
_start:
    mov     $0x3f8, %dx
    in      (%dx), %al
    out     %al, (%dx)
    hlt
