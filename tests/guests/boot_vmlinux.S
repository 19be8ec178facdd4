/* A 64-bit ELF "vmlinux" (linked by boot_vmlinux.ld): at startup_64, which is not the
 * start of its text, report RIP, RSI, boot_flag (0x1fe), header (0x202), version (0x206),
 * loadflags (0x211) and cmdline_size (0x238) from boot_params, the command line (length,
 * hash), a .data word, then .bss: its length and the sum of its bytes (zero if the loader
 * cleared it). */
    .include "boot_macros.S"
    .text
    .code64
not_the_entry:
    report  $0xbad
    hlt
    .balign 64
    .globl  startup_64
startup_64:
    lea     startup_64(%rip), %rax
    report  %rax
    report  %rsi
    movzwl  0x1fe(%rsi), %eax
    report  %rax
    movl    0x202(%rsi), %eax
    report  %rax
    movzwl  0x206(%rsi), %eax       /* version */
    report  %rax
    movzbl  0x211(%rsi), %eax       /* loadflags */
    report  %rax
    movl    0x238(%rsi), %eax       /* cmdline_size */
    report  %rax
    report_cmdline
    report  data_word(%rip)
    lea     bss_start(%rip), %rbx
    lea     bss_end(%rip), %rcx
    sub     %rbx, %rcx
    report  %rcx
    xor     %edi, %edi
1:  test    %rcx, %rcx
    jz      2f
    movzbl  (%rbx), %eax
    add     %rax, %rdi
    inc     %rbx
    dec     %rcx
    jmp     1b
2:  report  %rdi
    hlt

    .data
data_word:
    .quad   0x0123456789abcdef

    .bss
    .skip   0x1235
