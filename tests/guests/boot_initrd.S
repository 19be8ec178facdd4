/* Protected-mode part of a bzImage: at the 64-bit entry, report ramdisk_image (0x218)
 * and ramdisk_size (0x21c) from boot_params, then the hash of the bytes there. */
    .include "boot_macros.S"
    .code32
    .globl  _start
_start:
    hlt

    .org    0x200
    .code64
startup_64:
    movl    0x218(%rsi), %eax
    report  %rax
    movl    0x21c(%rsi), %eax
    report  %rax
    movl    0x218(%rsi), %ebx
    movl    0x21c(%rsi), %ecx
    hash31
    report  %rdi
    hlt
