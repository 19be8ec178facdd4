/* Two GPAs of one backing: write through the first, read through the second.
 * The test maps the backing so that 0x21010 and 0x30010 are the same byte,
 * then sees what the guest read on port 0x3f9. Loaded at 0x1000. */
    .code16
    .globl _start
_start:
    mov     $0x2000, %ax
    mov     %ax, %ds
    movl    $0x600dcafe, (0x1010)   /* writes GPA 0x21010 */
    mov     $0x3000, %ax
    mov     %ax, %ds
    movl    (0x10), %eax            /* reads GPA 0x30010 */
    xor     %bx, %bx
    mov     %bx, %ds
    mov     $0x3f9, %dx
    outl    %eax, (%dx)             /* exit: OUT 0x3f9, 4 bytes: what the read returned */
    hlt
