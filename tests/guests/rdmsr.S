/* RDMSR of the MSR the test put in ecx (one KVM does not know), then halt. */
    .code16
    .globl _start
_start:
    rdmsr                       /* exit: X86_RDMSR, with KVM_CAP_X86_USER_SPACE_MSR */
    hlt
