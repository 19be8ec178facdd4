/* Write one byte to each of three pages (0x3000, 0x5000, 0x9000) and halt:
 * those, and no others, must show in the dirty log. */
    .code16
    .globl _start
_start:
    movb    $1, (0x3000)
    movb    $2, (0x5123)
    movb    $3, (0x9fff)
    hlt
