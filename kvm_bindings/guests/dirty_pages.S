/* 32-bit protected mode: write one byte to each GPA listed at 0x2000 (a count, then that
 * many 32-bit GPAs), report with OUT 0x10, then start over (the host rewrites the list in
 * between). Exactly the listed pages, and no others, must show as dirty. */
    .code32
    .globl _start
_start:
    mov     $0x2000, %esi
    mov     (%esi), %ecx            /* how many GPAs */
    add     $4, %esi
1:  jecxz   2f
    mov     (%esi), %edi
    movb    $0xd1, (%edi)           /* dirty that page */
    add     $4, %esi
    dec     %ecx
    jmp     1b
2:  mov     $0x10, %dx
    outb    %al, (%dx)              /* exit: the list is done */
    jmp     _start
