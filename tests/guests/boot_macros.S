/* Included by the boot_*.S guests (not a guest itself): how they report what they find.
 * One value per exit: OUT of its low 32 bits to port 0x3f9, then (64-bit code only)
 * OUT of its high 32 bits to port 0x3fa. The macros clobber %rax and %rdx. */
REPORT = 0x3f9

.macro report32 src                 /* 32-bit code */
    mov     \src, %eax
    mov     $REPORT, %dx
    out     %eax, (%dx)
.endm

.macro report src                   /* 64-bit code */
    mov     \src, %rax
    mov     $REPORT, %dx
    out     %eax, (%dx)
    shr     $32, %rax
    inc     %dx
    out     %eax, (%dx)
.endm

/* %edi = the hash h = h * 31 + byte over the %rcx bytes at %rbx (the test computes the
 * same in Python): order-sensitive, so bytes that are moved or missing change it. */
.macro hash31
    xor     %edi, %edi
.Lhash\@:
    test    %rcx, %rcx
    jz      .Lhashed\@
    imul    $31, %edi, %edi
    movzbl  (%rbx), %eax
    add     %eax, %edi
    inc     %rbx
    dec     %rcx
    jmp     .Lhash\@
.Lhashed\@:
.endm

/* Report the command line at boot_params.hdr.cmd_line_ptr (0x228(%rsi)): its length up to
 * the NUL (at most 4096), then its hash. */
.macro report_cmdline
    movl    0x228(%rsi), %ebx
    xor     %ecx, %ecx
.Lstrlen\@:
    cmpb    $0, (%rbx,%rcx)
    je      .Lend\@
    inc     %ecx
    cmp     $4096, %ecx
    jb      .Lstrlen\@
.Lend\@:
    report  %rcx
    hash31
    report  %rdi
.endm

/* The start of a bzImage's protected-mode part whose 32-bit entry (offset 0) only halts;
 * what follows the macro is the 64-bit entry, at offset 0x200. */
.macro only_64_bit_entry
    .code32
    .globl  _start
_start:
    hlt
    .org    0x200
    .code64
.endm
