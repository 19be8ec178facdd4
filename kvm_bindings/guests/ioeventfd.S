/* Write port 0x500 five times (an ioeventfd turns these into eventfd signals,
 * not exits), write 0x1234 once to MMIO 0xd0000 (a datamatch ioeventfd), then
 * report on port 0x3f8. */
    .code16
    .globl _start
_start:
    mov     $0x500, %dx
    mov     $5, %cx
1:  out     %al, (%dx)
    loop    1b
    mov     $0xd000, %ax
    mov     %ax, %ds
    movw    $0x1234, (0)
    movw    $0x9999, (0)            /* no match: an ordinary MMIO exit */
    xor     %ax, %ax
    mov     %ax, %ds
    mov     $0x3f8, %dx
    out     %al, (%dx)
    hlt
