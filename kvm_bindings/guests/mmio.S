/* MMIO in real mode: a write to and a read from 0xd0000, which no memory slot
 * backs, then a write to the read-only slot at 0x20000. The value read is
 * written back to port 0x3f9 so the test sees what the guest got. */
    .code16
    .globl _start
_start:
    mov     $0xd000, %ax
    mov     %ax, %ds
    movl    $0xcafef00d, (0x10)     /* exit: MMIO write 0xd0010, 4 bytes */
    movl    (0x20), %eax            /* exit: MMIO read 0xd0020, 4 bytes, answered by the test */
    xor     %bx, %bx
    mov     %bx, %ds
    mov     $0x3f9, %dx
    outl    %eax, (%dx)             /* exit: OUT 0x3f9, 4 bytes: what the read returned */
    mov     $0x2000, %bx
    mov     %bx, %ds
    movl    (0x0), %eax             /* reads the read-only slot: no exit */
    movw    $0xbeef, (0x8)          /* exit: MMIO write 0x20008 (read-only slot) */
    xor     %bx, %bx
    mov     %bx, %ds
    outl    %eax, (%dx)             /* exit: OUT 0x3f9, what the read-only slot holds */
    hlt
