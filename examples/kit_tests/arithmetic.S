// Long-mode arithmetic, checked in the guest and reported to the host.
// Built by test_kvm_basics.py with kvm_bindings.testing.assemble(); kvm_ucall.h is included.

    // 10! with mul: rax = 1, rcx = 10 .. 1
    mov $1, %rax
    mov $10, %rcx
1:  mul %rcx                        // rdx:rax = rax * rcx
    loop 1b
    GUEST_ASSERT_EQ(%rax, $3628800)
    GUEST_SYNC(%rax)

    // 64-bit division: 2^40 + 7 divided by 1000
    movabs $0x10000000007, %rax
    xor %edx, %edx
    mov $1000, %rbx
    div %rbx
    GUEST_ASSERT_EQ(%rax, $1099511627)
    GUEST_ASSERT_EQ(%rdx, $783)
    GUEST_PRINTF("quotient %d, remainder %d", %rax, %rdx)

    // a shift past bit 31 keeps its bits in long mode
    mov $1, %rax
    shl $40, %rax
    mov $0xffffffff, %ebx           // (a 64-bit immediate would not fit a ucall operand)
    GUEST_ASSERT_GT(%rax, %rbx)
    GUEST_SYNC(%rax)
    GUEST_DONE
