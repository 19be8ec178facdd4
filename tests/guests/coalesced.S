/* Three writes into a coalesced MMIO zone at 0xe0000 and one to the coalesced
 * port 0x600 (all buffered in the ring, no exits), then a port write to 0x3f8
 * so the test can look at the ring. */
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
    mov     $0x600, %dx
    mov     $0x44, %al
    out     %al, (%dx)
    mov     $0x3f8, %dx
    out     %al, (%dx)
    hlt
