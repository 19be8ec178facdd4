/* Protected-mode part of a bzImage: at the 64-bit entry (offset 0x200), report the CPU
 * state the loader left: RIP, CS, DS, ES, SS, RSI, RFLAGS, CR0, EFER. The 32-bit entry
 * (offset 0) reports 0x32 instead, so taking it shows. */
    .include "boot_macros.S"
    .code32
    .globl  _start
_start:
    report32 $0x32
    hlt

    .org    0x200
    .code64
startup_64:
    lea     startup_64(%rip), %rax
    report  %rax
    xor     %eax, %eax
    mov     %cs, %ax
    report  %rax
    mov     %ds, %ax
    report  %rax
    mov     %es, %ax
    report  %rax
    mov     %ss, %ax
    report  %rax
    report  %rsi
    pushf
    pop     %rax
    report  %rax
    mov     %cr0, %rax
    report  %rax
    mov     $0xc0000080, %ecx       /* IA32_EFER */
    rdmsr
    report  %rax                    /* its low half: LME is bit 8, LMA bit 10 */
    hlt
