/* kvm_ucall.h: the guest side of kvm_bindings.testing's ucall protocol (GNU as, x86).
 *
 * Include it from a .S file run through the C preprocessor (gcc -c file.S);
 * kvm_bindings.testing.assemble() does so for you. Define UCALL_BITS (16, 32 or 64:
 * the guest's operand width in real, protected or long mode) before each use if it
 * is not 64; assemble() defines it from its mode argument.
 *
 * Each ucall is one `outl %eax, $UCALL_PORT` whose value is the guest-physical
 * address of a 64-byte record laid out inline, next to the code that uses it:
 *
 *    0  u32 magic "UCAL" (0x4c414355)    20  u32 address of a second text, or 0
 *    4  u8  command (UCALL_SYNC ...)     24  u64 values[4] (the low width bytes hold them)
 *    5  u8  width of each value, bytes   56  u64 scratch: the accumulator while the
 *    6  u8  number of values                    ucall runs
 *    7  u8  comparison (UCALL_OP_...)
 *    8  u32 line (__LINE__)
 *   12  u32 address of the file name (__FILE__), NUL-terminated
 *   16  u32 address of the text (format, condition, left operand), NUL-terminated
 *
 * So the record and its strings must lie below 4 GiB (below 64 KiB in real mode).
 * The code writes into its own record: the guest's code must sit in writable RAM.
 *
 * Operands (value, a, b) are a register of the mode's width (%ax in real mode,
 * %eax in protected mode, %rax in long mode) or an immediate ($5, $label); in long
 * mode an immediate must fit in 32 bits signed (as for any movq), so compare a wider
 * constant through a register (movabs $0x100000000, %rbx).
 * Every macro preserves every register; GUEST_SYNC, GUEST_PRINTF and GUEST_DONE
 * preserve the flags too (the comparisons set them, as cmp does).
 *
 *   GUEST_SYNC(value)           the host's loop yields Sync(value), then resumes the guest
 *   GUEST_PRINTF("fmt", v...)   Print(fmt % values): Python %-formatting, up to 4 values
 *   GUEST_PRINT("text")         Print(text)
 *   GUEST_ASSERT_EQ(a, b)       a == b, else the host raises GuestAssertionError
 *   GUEST_ASSERT_NE(a, b)       a != b
 *   GUEST_ASSERT_LT(a, b)       a < b, unsigned (also _LE, _GT, _GE)
 *   GUEST_ASSERT(cc)            the condition code cc holds now (z, nz, c, nc, e, ne, b, ae,
 *                               s, ns, o, no, l, ge, ...: any jcc suffix)
 *   GUEST_FAIL("fmt", v...)     an assertion that always fails, with the formatted text
 *   GUEST_DONE                  the guest is finished: the host's loop ends
 * After a failed assertion or GUEST_DONE the guest halts (hlt in a loop).
 */
#ifndef KVM_UCALL_H
#define KVM_UCALL_H

#ifndef UCALL_BITS
#define UCALL_BITS 64
#endif
#ifndef UCALL_PORT
#define UCALL_PORT 0xe7
#endif

#define UCALL_MAGIC 0x4c414355
#define UCALL_SYNC 1
#define UCALL_PRINT 2
#define UCALL_ASSERT 3
#define UCALL_DONE 4
#define UCALL_OP_NONE 0
#define UCALL_OP_EQ 1
#define UCALL_OP_NE 2
#define UCALL_OP_LT 3
#define UCALL_OP_LE 4
#define UCALL_OP_GT 5
#define UCALL_OP_GE 6
#define UCALL_OP_CC 7
#define UCALL_MAX_VALUES 4

#define GUEST_SYNC(value) ucall_values UCALL_BITS, UCALL_SYNC, __FILE__, __LINE__, "", value
#define GUEST_PRINTF(...) ucall_values UCALL_BITS, UCALL_PRINT, __FILE__, __LINE__, __VA_ARGS__
#define GUEST_PRINT(text) ucall_values UCALL_BITS, UCALL_PRINT, __FILE__, __LINE__, text
#define GUEST_FAIL(...) ucall_fail UCALL_BITS, __FILE__, __LINE__, __VA_ARGS__
#define GUEST_DONE ucall_done UCALL_BITS, __FILE__, __LINE__
#define GUEST_ASSERT(cc) ucall_assert_cc UCALL_BITS, __FILE__, __LINE__, cc
#define UCALL_CMP_(op, cc, lhs, rhs) \
    ucall_assert_cmp UCALL_BITS, __FILE__, __LINE__, op, cc, #lhs, #rhs, lhs, rhs
#define GUEST_ASSERT_EQ(lhs, rhs) UCALL_CMP_(UCALL_OP_EQ, e, lhs, rhs)
#define GUEST_ASSERT_NE(lhs, rhs) UCALL_CMP_(UCALL_OP_NE, ne, lhs, rhs)
#define GUEST_ASSERT_LT(lhs, rhs) UCALL_CMP_(UCALL_OP_LT, b, lhs, rhs)
#define GUEST_ASSERT_LE(lhs, rhs) UCALL_CMP_(UCALL_OP_LE, be, lhs, rhs)
#define GUEST_ASSERT_GT(lhs, rhs) UCALL_CMP_(UCALL_OP_GT, a, lhs, rhs)
#define GUEST_ASSERT_GE(lhs, rhs) UCALL_CMP_(UCALL_OP_GE, ae, lhs, rhs)

/* mov of the mode's width: a register or an immediate to memory, or memory to the accumulator */
.macro ucall_mov bits, src, dst
    .if \bits == 64
        movq \src, \dst
    .elseif \bits == 32
        movl \src, \dst
    .elseif \bits == 16
        movw \src, \dst
    .else
        .error "UCALL_BITS must be 16, 32 or 64"
    .endif
.endm

/* The record (see above), jumped over; labels .Lucall_rec<id>, then the code at .Lucall_code<id>. */
.macro ucall_record id, bits, cmd, op, file, line, text, text2, nvalues
    jmp .Lucall_code_\id
    .balign 8, 0xcc
.Lucall_rec_\id:
    .long UCALL_MAGIC
    .byte \cmd, (\bits) / 8, \nvalues, \op
    .long \line
    .long .Lucall_file_\id, .Lucall_text_\id, .Lucall_right_\id
    .quad 0, 0, 0, 0, 0
.Lucall_file_\id:
    .asciz "\file"
.Lucall_text_\id:
    .asciz "\text"
.Lucall_right_\id:
    .asciz "\text2"
.Lucall_code_\id:
.endm

/* The out that hands the record to the host, keeping the accumulator in the record's scratch. */
.macro ucall_out id, bits
    .if \bits == 64
        movq %rax, .Lucall_rec_\id + 56
    .else
        movl %eax, .Lucall_rec_\id + 56
    .endif
    movl $.Lucall_rec_\id, %eax
    outl %eax, $UCALL_PORT
    .if \bits == 64
        movq .Lucall_rec_\id + 56, %rax
    .else
        movl .Lucall_rec_\id + 56, %eax
    .endif
.endm

.macro ucall_halt id
.Lucall_halt_\id:
    hlt
    jmp .Lucall_halt_\id
.endm

/* Store up to UCALL_MAX_VALUES operands into the record's values[]. */
.macro ucall_store id, bits, values:vararg
    .Lucall_i_\id = 0
    .irp v, \values
        .ifnb \v
            ucall_mov \bits, \v, .Lucall_rec_\id+24+8*.Lucall_i_\id
            .Lucall_i_\id = .Lucall_i_\id + 1
        .endif
    .endr
.endm

.macro ucall_count id, values:vararg
    .Lucall_n_\id = 0
    .irp v, \values
        .ifnb \v
            .Lucall_n_\id = .Lucall_n_\id + 1
        .endif
    .endr
    .if .Lucall_n_\id > UCALL_MAX_VALUES
        .error "a ucall carries at most 4 values"
    .endif
.endm

.macro ucall_values bits, cmd, file, line, text, values:vararg
    ucall_count \@, \values
    ucall_record \@, \bits, \cmd, UCALL_OP_NONE, \file, \line, "\text", "", .Lucall_n_\@
    ucall_store \@, \bits, \values
    ucall_out \@, \bits
.endm

.macro ucall_fail bits, file, line, text, values:vararg
    ucall_count \@, \values
    ucall_record \@, \bits, UCALL_ASSERT, UCALL_OP_NONE, \file, \line, "\text", "", .Lucall_n_\@
    ucall_store \@, \bits, \values
    ucall_out \@, \bits
    ucall_halt \@
.endm

.macro ucall_done bits, file, line
    ucall_record \@, \bits, UCALL_DONE, UCALL_OP_NONE, \file, \line, "", "", 0
    ucall_out \@, \bits
    ucall_halt \@
.endm

.macro ucall_assert_cc bits, file, line, cc
    ucall_record \@, \bits, UCALL_ASSERT, UCALL_OP_CC, \file, \line, "\cc", "", 0
    j\cc .Lucall_ok_\@
    ucall_out \@, \bits
    ucall_halt \@
.Lucall_ok_\@:
.endm

/* a and b go to values[0] and values[1]; the accumulator is compared with values[1]
 * after being loaded from values[0], then restored (mov leaves the flags alone). */
.macro ucall_assert_cmp bits, file, line, op, cc, atext, btext, a, b
    ucall_record \@, \bits, UCALL_ASSERT, \op, \file, \line, "\atext", "\btext", 2
    ucall_store \@, \bits, \a, \b
    .if \bits == 64
        movq %rax, .Lucall_rec_\@ + 56
        movq .Lucall_rec_\@ + 24, %rax
        cmpq .Lucall_rec_\@ + 32, %rax
        movq .Lucall_rec_\@ + 56, %rax
    .elseif \bits == 32
        movl %eax, .Lucall_rec_\@ + 56
        movl .Lucall_rec_\@ + 24, %eax
        cmpl .Lucall_rec_\@ + 32, %eax
        movl .Lucall_rec_\@ + 56, %eax
    .else
        movw %ax, .Lucall_rec_\@ + 56
        movw .Lucall_rec_\@ + 24, %ax
        cmpw .Lucall_rec_\@ + 32, %ax
        movw .Lucall_rec_\@ + 56, %ax
    .endif
    j\cc .Lucall_ok_\@
    ucall_out \@, \bits
    ucall_halt \@
.Lucall_ok_\@:
.endm

#endif /* KVM_UCALL_H */
