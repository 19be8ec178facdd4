/* Two vCPUs share this code. vCPU 0 (ax = 0) waits for a flag that vCPU 1
 * (ax = 1) sets; each then reports on port 0x3f8 + its number. vCPU 0 finishes
 * only if vCPU 1 ran while it was spinning. */
    .code16
    .globl _start
_start:
    cmp     $0, %ax
    jne     second
1:  cmpb    $1, (0x7000)
    jne     1b
    mov     $0x3f8, %dx
    out     %al, (%dx)
    hlt
second:
    movb    $1, (0x7000)
    mov     $0x3f9, %dx
    out     %al, (%dx)
    hlt
