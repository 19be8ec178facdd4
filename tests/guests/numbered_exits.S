/* Exits that differ from each other: for cx = 200 down to 1, an OUT of cl to port 0x3f8,
 * an MMIO write of cl to 0xd0010, an IN from 0x3f8 (answered by the test) and an MMIO
 * write of what the IN returned to 0xd0011. Then halt. */
    .code16
    .globl _start
_start:
    mov     $0xd000, %ax
    mov     %ax, %ds
    mov     $0x3f8, %dx
    mov     $200, %cx
1:  mov     %cl, %al
    out     %al, (%dx)              /* exit: OUT 0x3f8, 1 byte: cl */
    mov     %cl, (0x10)             /* exit: MMIO write 0xd0010, 1 byte: cl */
    in      (%dx), %al              /* exit: IN 0x3f8, 1 byte, answered by the test */
    mov     %al, (0x11)             /* exit: MMIO write 0xd0011, 1 byte: the answer */
    loop    1b
    hlt
