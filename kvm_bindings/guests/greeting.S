/* The demo guest (python -m kvm_bindings demo): print a greeting one byte at
 * a time to the serial port 0x3f8, then halt. */
    .code16
    .globl _start
_start:
    mov     $0x3f8, %dx
    mov     $greeting, %si
    cld
1:  lodsb
    test    %al, %al
    jz      2f
    out     %al, (%dx)
    jmp     1b
2:  hlt
greeting:
    .asciz  "Hello from a KVM guest, run by kvm-bindings!\n"
