/* kvm-ioctls' x86 run test, in real mode at 0x1000 with memory at 0x1000..0x5000:
 * port I/O, an MMIO write and read outside memory, then one guest write that
 * dirties a page. The test single-steps the first three instructions. */
    .code16
    .globl _start
_start:
    mov     $0x3f8, %dx         /* 3 bytes: the first step ends at 0x1003 */
    add     %bl, %al            /* 0x1005: al = 2 + 3 */
    add     $'0', %al           /* 0x1007: al = '5' */
    out     %al, (%dx)          /* exit: OUT 0x3f8, '5' */
    in      (%dx), %al          /* exit: IN 0x3f8 */
    movb    $0, (0x8000)        /* exit: MMIO write of one byte at 0x8000 */
    mov     (0x8000), %dl       /* exit: MMIO read of one byte at 0x8000 */
    movb    $0, (0x2000)        /* dirties the page at 0x2000 */
    hlt
