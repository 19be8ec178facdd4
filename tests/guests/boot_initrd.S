/* Protected-mode part of a bzImage: at the 64-bit entry, report ramdisk_image (0x218)
 * and ramdisk_size (0x21c) from boot_params, then the hash of the bytes there. */
    .include "boot_macros.S"
    only_64_bit_entry
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
