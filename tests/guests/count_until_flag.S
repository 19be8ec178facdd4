/* Spin, counting loop iterations in the dword at 0x7004 (so the test can see
 * the guest running), until the byte at 0x7000 is non-zero; then OUT that byte
 * to port 0x3f8 and halt. Only kick(), a signal or immediate_exit stops the
 * spin from outside. */
    .code16
    .globl _start
_start:
1:  incl    (0x7004)
    cmpb    $0, (0x7000)
    je      1b
    mov     $0x3f8, %dx
    mov     (0x7000), %al
    out     %al, (%dx)              /* exit: OUT 0x3f8, the flag */
    hlt
