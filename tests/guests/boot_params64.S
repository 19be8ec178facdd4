/* Protected-mode part of a bzImage: at the 64-bit entry, read boot_params through %rsi
 * and report boot_flag (0x1fe), header (0x202), version (0x206), type_of_loader (0x210),
 * init_size (0x260), code32_start (0x214), then the command line at cmd_line_ptr (0x228): length, hash. */
    .include "boot_macros.S"
    only_64_bit_entry
startup_64:
    movzwl  0x1fe(%rsi), %eax
    report  %rax
    movl    0x202(%rsi), %eax
    report  %rax
    movzwl  0x206(%rsi), %eax
    report  %rax
    movzbl  0x210(%rsi), %eax
    report  %rax
    movl    0x260(%rsi), %eax
    report  %rax
    movl    0x214(%rsi), %eax
    report  %rax
    report_cmdline
    hlt
