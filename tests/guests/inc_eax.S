/* One increment, then halt: the test sets eax (through kvm_run sync regs) and
 * reads it back. */
    .code16
    .globl _start
_start:
    inc     %eax
    hlt
