/* A hypercall with AMD's instruction: nr in eax, arguments in ebx, ecx, edx. */
    .code16
    .globl _start
_start:
    vmmcall                     /* exit: HYPERCALL, with KVM_CAP_EXIT_HYPERCALL for nr */
    hlt
