/* The multi-vCPU benchmark guest: every vCPU runs this same code, writing al to
 * port dx forever; the host sets both, a distinct port and byte per vCPU. Each OUT
 * is one KVM_EXIT_IO; the host stops by not calling KVM_RUN again. No stack, no
 * stores: the vCPUs share nothing but these read-only bytes. */
    .code16
    .globl _start
_start:
1:  out     %al, (%dx)
    jmp     1b
