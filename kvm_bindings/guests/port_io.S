/* Port I/O in real mode: OUT a byte, IN a byte the test answers and echo it
 * back, then a rep outsb of a whole string. Loaded at 0x1000. */
    .code16
    .globl _start
_start:
    mov     $0x3f8, %dx
    mov     $'H', %al
    out     %al, (%dx)          /* exit: OUT 0x3f8, 'H' */
    in      (%dx), %al          /* exit: IN 0x3f8, the test writes the answer */
    mov     $0x3f9, %dx
    out     %al, (%dx)          /* exit: OUT 0x3f9, the answer as the guest saw it */
    mov     $0x3f8, %dx
    mov     $message, %si
    mov     $(message_end - message), %cx
    cld
    rep outsb                   /* exit(s): OUT 0x3f8 with count > 1 */
    hlt
message:
    .ascii  "hello, kvm"
message_end:
