/* A deterministic computation paced by timer interrupts, for snapshot tests (long mode,
 * set up by kvm_bindings.x86; stack below 0x7000).
 *
 * The in-kernel PIC puts IRQ 0 at vector 0x20 (IDT at 0x2000, built here); the in-kernel
 * PIT (channel 0, rate generator) ticks at about 2 kHz; its handler counts ticks at
 * 0x3004 and sends EOI. The LAPIC's own timer (periodic, vector 0x30, about 2 kHz; the
 * LAPIC page at 0xfee00000 must be identity-mapped) counts at 0x300c. The main loop
 * halts until both counts move, then takes one
 * step and reports it with a 4-byte OUT to port 0xe9. The value mixes: ebx (a 32-bit LCG),
 * the MSR IA32_KERNEL_GS_BASE (kept only there, incremented each step) and a word at
 * fs:0 (FS base 0x3000, set through IA32_FS_BASE), rotated each step. So it depends on
 * general registers, MSRs, a segment base and memory, and on the PIC, PIT and LAPIC going
 * on delivering interrupts (without them the guest halts for ever). It never depends on
 * when the ticks come: only on how many steps were taken. (No x87 or SSE: this host's
 * software-assisted KVM cannot run them, so the tests check FPU state through the
 * kernel instead.) */
    .code64
    .globl _start
_start:
    cli
    lea     tick(%rip), %rax        /* IDT gate 0x20: a 64-bit interrupt gate to tick */
    mov     %ax, 0x2200
    mov     %cs, %cx
    mov     %cx, 0x2202
    movw    $0x8e00, 0x2204
    shr     $16, %rax
    mov     %ax, 0x2206
    shr     $16, %rax
    mov     %eax, 0x2208
    movl    $0, 0x220c
    lea     apic_tick(%rip), %rax   /* IDT gate 0x30: to apic_tick */
    mov     %ax, 0x2300
    mov     %cx, 0x2302
    movw    $0x8e00, 0x2304
    shr     $16, %rax
    mov     %ax, 0x2306
    shr     $16, %rax
    mov     %eax, 0x2308
    movl    $0, 0x230c
    lidt    idtr(%rip)
    /* master 8259: IRQ 0-7 at vectors 0x20-0x27, only IRQ 0 unmasked */
    mov     $0x11, %al
    out     %al, $0x20
    mov     $0x20, %al
    out     %al, $0x21
    mov     $0x04, %al
    out     %al, $0x21
    mov     $0x01, %al
    out     %al, $0x21
    mov     $0xfe, %al
    out     %al, $0x21
    /* PIT channel 0: lobyte/hibyte, mode 2, divisor 597 (1193182 / 597 = ~2 kHz) */
    mov     $0x34, %al
    out     %al, $0x43
    mov     $(597 & 0xff), %al
    out     %al, $0x40
    mov     $(597 >> 8), %al
    out     %al, $0x40
    mov     $0xc0000100, %ecx       /* IA32_FS_BASE: fs:0 is 0x3000 */
    mov     $0x3000, %eax
    xor     %edx, %edx
    wrmsr
    mov     $0xc0000102, %ecx       /* IA32_KERNEL_GS_BASE: a counter only the MSR holds */
    mov     $0x5eed, %eax
    xor     %edx, %edx
    wrmsr
    /* LAPIC: software-enabled (spurious vector 0xff), timer periodic at vector 0x30,
     * divide by 1, 500000 bus cycles (KVM's LAPIC bus runs at 1 GHz) */
    mov     $0xfee00000, %esi
    movl    $0x1ff, 0xf0(%rsi)
    movl    $0xb, 0x3e0(%rsi)
    movl    $0x20030, 0x320(%rsi)
    movl    $500000, 0x380(%rsi)
    movl    $0, 0x300c
    movl    $0x9e3779b9, 0x3000     /* the word each step rotates */
    movl    $0, 0x3004              /* the tick count */
    mov     $12345, %ebx            /* the LCG's state */
    sti
step:
    mov     0x3004, %ecx
    mov     0x300c, %edi
1:  hlt                             /* in-kernel: sleeps until the next interrupt */
    cmp     0x3004, %ecx
    je      1b                      /* until the PIT has ticked */
2:  cmp     0x300c, %edi
    jne     3f
    hlt
    jmp     2b                      /* and the LAPIC timer too */
3:
    imul    $1103515245, %ebx, %ebx
    add     $12345, %ebx
    roll    $5, %fs:0
    mov     $0xc0000102, %ecx
    rdmsr
    inc     %eax
    wrmsr
    mov     %eax, %esi
    mov     %ebx, %eax
    xor     %fs:0, %eax
    add     %esi, %eax
    mov     $0xe9, %dx
    out     %eax, (%dx)             /* exit: one step's value */
    jmp     step

tick:
    incl    0x3004
    push    %rax
    mov     $0x20, %al
    out     %al, $0x20              /* EOI */
    pop     %rax
    iretq

apic_tick:
    incl    0x300c
    push    %rax
    mov     $0xfee00000, %eax
    movl    $0, 0xb0(%rax)          /* LAPIC EOI */
    pop     %rax
    iretq

idtr:
    .word   0xfff
    .quad   0x2000
