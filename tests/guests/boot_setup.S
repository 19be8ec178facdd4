/* The setup sectors of a test bzImage: the boot sector and SETUP_SECTS more, holding
 * the setup header at the offsets Documentation/arch/x86/boot.rst gives. Every field
 * the test varies comes from `as --defsym NAME=value`; the rest stay zero, as the
 * loader's fields (type_of_loader, ramdisk_*, cmd_line_ptr) are in an image. No
 * real-mode code: the loader enters the protected-mode part that follows. A header that
 * ends early (HEADER_END below 0x26c, as in an older protocol's) still has the later
 * fields' bytes after it: there they stand for setup code a loader must not read. */
    .text
    .org    0x1f1
    .byte   SETUP_SECTS             /* setup_sects */
    .org    0x1fe
    .word   0xAA55                  /* boot_flag */
    .org    0x200
    .byte   0xeb, HEADER_END - 0x202 /* jump: a short jmp past the header, to HEADER_END */
    .ascii  "HdrS"                  /* header, at 0x202 */
    .org    0x206
    .word   VERSION                 /* version */
    .org    0x211
    .byte   LOADFLAGS               /* loadflags */
    .org    0x214
    .long   CODE32_START            /* code32_start */
    .org    0x22c
    .long   INITRD_ADDR_MAX         /* initrd_addr_max */
    .org    0x230
    .long   KERNEL_ALIGNMENT        /* kernel_alignment */
    .org    0x234
    .byte   RELOCATABLE_KERNEL      /* relocatable_kernel */
    .org    0x236
    .word   XLOADFLAGS              /* xloadflags */
    .org    0x238
    .long   CMDLINE_SIZE            /* cmdline_size */
    .org    0x258
    .quad   PREF_ADDRESS            /* pref_address */
    .org    0x260
    .long   INIT_SIZE               /* init_size */
    .org    (SETUP_SECTS + 1) * 512 /* the protected-mode part starts here */
