/* The same two-byte MMIO write to 0x124 (outside memory) twice, halting after
 * each: once while 0x124 is coalesced (no exit), once after the zone is removed. */
    .code16
    .globl _start
_start:
    mov     $0x124, %di
    mov     %ax, (%di)
    hlt
    mov     %ax, (%di)
    hlt
