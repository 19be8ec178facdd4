/* A 32-bit ELF (as --32, ld -m elf_i386): what load_linux() must refuse as a vmlinux. */
    .code32
    .globl  _start
_start:
    hlt
