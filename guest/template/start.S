/*
 * Entry for QEMU's -kernel: a multiboot v1 header (QEMU's loader for pc, q35 and
 * microvm), a stack, and a jump to C.  The loader leaves us in 32-bit protected mode
 * with paging off, so addresses are guest-physical (what `vdev inspect` relies on).
 */
    .section .multiboot, "a"
    .align 4
    .long 0x1BADB002                 /* magic */
    .long 0x00000003                 /* flags: page-align modules, memory info */
    .long -(0x1BADB002 + 0x00000003) /* checksum */

    .section .text
    .globl _start
_start:
    cli
    movl $stack_top, %esp
    cld                              /* zero .bss: C expects its statics to start at 0 */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb
    call main
1:  hlt
    jmp 1b

    .section .stack, "aw", @nobits
    .align 16
    .space 16384
stack_top:
    .section .note.GNU-stack, "", @progbits
