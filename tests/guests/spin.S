/* Loop forever: only kick(), a signal or immediate_exit brings the vCPU back. */
    .code16
    .globl _start
_start:
    jmp     _start
