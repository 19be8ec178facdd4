/* Protected-mode part of a bzImage: at the 64-bit entry, report boot_params' e820 map:
 * e820_entries (byte at 0x1e8), then each 20-byte entry of e820_table (0x2d0): its
 * address (u64), size (u64) and type (u32). */
    .include "boot_macros.S"
    only_64_bit_entry
startup_64:
    movzbl  0x1e8(%rsi), %ecx
    report  %rcx
    lea     0x2d0(%rsi), %rbx
1:  test    %ecx, %ecx
    jz      2f
    report  0(%rbx)
    report  8(%rbx)
    movl    16(%rbx), %eax
    report  %rax
    add     $20, %rbx
    dec     %ecx
    jmp     1b
2:  hlt
