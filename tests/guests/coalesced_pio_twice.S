/* The same one-byte port write twice, halting after each: once while port 0x2c
 * is coalesced (no exit), once after the test has removed the zone (an exit). */
    .code16
    .globl _start
_start:
    out     %al, $0x2c
    hlt
    out     %al, $0x2c
    hlt
