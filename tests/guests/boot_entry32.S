/* Protected-mode part of a bzImage: at the 32-bit entry (offset 0), report ESI, EBP,
 * EDI, EBX as the loader left them, then EIP, CS, DS, ES, SS, EFLAGS, CR0 and the
 * header magic at 0x202(%esi). */
    .include "boot_macros.S"
    .code32
    .globl  _start
_start:
    report32 %esi
    report32 %ebp
    report32 %edi
    report32 %ebx
    call    1f
1:  pop     %eax
    sub     $(1b - _start), %eax
    report32 %eax
    xor     %eax, %eax
    mov     %cs, %ax
    report32 %eax
    mov     %ds, %ax
    report32 %eax
    mov     %es, %ax
    report32 %eax
    mov     %ss, %ax
    report32 %eax
    pushf
    pop     %eax
    report32 %eax
    mov     %cr0, %eax
    report32 %eax
    report32 0x202(%esi)
    hlt

    .org    0x200
    .code64
startup_64:                         /* the 64-bit entry: not taken with bits=32 */
    report  $0x64
    hlt
