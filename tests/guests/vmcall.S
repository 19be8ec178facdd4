/* A hypercall with Intel's instruction: nr in eax, arguments in ebx, ecx, edx. */
    .code16
    .globl _start
_start:
    vmcall                      /* exit: HYPERCALL, with KVM_CAP_EXIT_HYPERCALL for nr */
    hlt
