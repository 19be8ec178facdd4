/* Three writes into a coalesced MMIO zone at 0xe0000 (buffered in the ring, no
 * exits), then a port write so the test can look at the ring. */
    .code16
    .globl _start
_start:
    mov     $0xe000, %ax
    mov     %ax, %ds
    movb    $0x11, (0x0)
    movw    $0x2222, (0x10)
    movl    $0x33333333, (0x20)
    xor     %ax, %ax
    mov     %ax, %ds
    mov     $0x3f8, %dx
    out     %al, (%dx)
    hlt
