/* Every vCPU runs this (long mode, set up by kvm_bindings.x86; the LAPIC page at
 * 0xfee00000 identity-mapped): it reads its own APIC ID from the LAPIC and reports an
 * endless stream of values on port 0xe9 + ID. Each value mixes a 32-bit LCG seeded from
 * the ID (kept in ebx) with a counter of its own in memory (0x3000 + 8 * ID). So the
 * streams tell the vCPUs apart, and a vCPU restored with another's registers, LAPIC or
 * memory reports on the wrong port or the wrong values. No interrupts, no stack. */
    .code64
    .globl _start
_start:
    mov     $0xfee00000, %esi
    mov     0x20(%rsi), %ecx        /* LAPIC ID register: the ID is in bits 31:24 */
    shr     $24, %ecx
    lea     0xe9(%rcx), %edx        /* this vCPU's port */
    lea     1(%rcx), %ebx
    imul    $0x9e3779b1, %ebx, %ebx /* this vCPU's seed */
    movq    $0, 0x3000(,%rcx,8)
1:  imul    $1103515245, %ebx, %ebx
    add     $12345, %ebx
    incl    0x3000(,%rcx,8)
    mov     %ebx, %eax
    xor     0x3000(,%rcx,8), %eax
    out     %eax, (%dx)             /* exit: one value */
    jmp     1b
