/* The smallest guest: halt at once. */
    .code16
    .globl _start
_start:
    hlt
