/* In 32-bit protected mode, load an empty IDT and divide by zero: with no
 * handler the fault becomes a double fault, then a triple fault, and the CPU
 * shuts down. */
    .code32
    .globl _start
_start:
    lidt    empty_idt
    xor     %ecx, %ecx
    div     %ecx                    /* #DE with no IDT: #DF, then a triple fault */
    hlt
empty_idt:
    .word   0
    .long   0
