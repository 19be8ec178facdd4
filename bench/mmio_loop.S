/* The MMIO benchmark guest: a byte write (cl) to guest-physical 0x10000, just past the
 * benchmark's 64 KiB of memory, ecx times (ecx set by the host), then halt. No slot backs
 * that address, so each write is one KVM_EXIT_MMIO. */
    .code16
    .globl _start
_start:
    mov     $0x1000, %ax
    mov     %ax, %ds            /* ds base 0x10000: offset 0 is the first unbacked byte */
1:  mov     %cl, (0)
    dec     %ecx
    jnz     1b
    hlt
