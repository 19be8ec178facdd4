/* An interrupt through the in-kernel PIC: program the master 8259 to put IRQ 5
 * at vector 0x25, install a handler in the real-mode IVT, report ready on port
 * 0x3f8 and wait. The handler reports on port 0x3f9 and halts. */
    .code16
    .globl _start
_start:
    cli
    movw    $handler, (0x25 * 4)    /* IVT entry 0x25: offset */
    movw    $0, (0x25 * 4 + 2)      /*                 segment */
    mov     $0x11, %al              /* ICW1: edge, cascade, ICW4 follows */
    out     %al, $0x20
    mov     $0x20, %al              /* ICW2: vectors 0x20..0x27 */
    out     %al, $0x21
    mov     $0x04, %al              /* ICW3: slave on IRQ 2 */
    out     %al, $0x21
    mov     $0x01, %al              /* ICW4: 8086 mode */
    out     %al, $0x21
    mov     $0xdf, %al              /* mask all but IRQ 5 */
    out     %al, $0x21
    mov     $0x3f8, %dx
    out     %al, (%dx)              /* exit: ready */
    sti
1:  hlt                             /* in-kernel: sleeps until the interrupt */
    jmp     1b
handler:
    mov     $0x3f9, %dx
    mov     $0x25, %al
    out     %al, (%dx)              /* exit: the handler ran */
    mov     $0x20, %al
    out     %al, $0x20              /* EOI */
    cli
    hlt
