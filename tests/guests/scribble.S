/* Fill guest RAM from 0x2000 to the end of the first 64 KiB with 0xa5, over
 * and over, never exiting: a guest that writes to its memory until stopped. */
    .code16
    .globl _start
_start:
    cld
1:  mov     $0x2000, %di            /* es = 0: the fill starts at 0x2000 */
    mov     $0xa5a5, %ax
    mov     $((0x10000 - 0x2000) / 2), %cx
    rep stosw                       /* words up to 0xffff */
    jmp     1b
