/*
 * Entry points.  QEMU's -kernel loader accepts this 32-bit ELF either through
 * the multiboot v1 header (pc, q35) or through the PVH ELF note
 * (XEN_ELFNOTE_PHYS32_ENTRY).  Both enter in 32-bit protected mode with
 * paging off; they differ only in what %eax/%ebx carry, so both paths end in
 * boot_common, which calls kmain(protocol magic, info pointer).
 */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003          /* page-align modules, want memory info */

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    /* ELF note read by QEMU's load_elfboot(): type 18 = XEN_ELFNOTE_PHYS32_ENTRY. */
    .section .note.pvh, "a", @note
    .align 4
    .long 4                          /* namesz: "Xen\0" */
    .long 4                          /* descsz: 32-bit entry address */
    .long 18
    .asciz "Xen"
    .long pvh_start

    .section .text.entry, "ax"
    .code32
    .globl _start
_start:                              /* multiboot: eax = 0x2BADB002, ebx = mbi */
    cli
    movl %eax, %esi
    movl %ebx, %ebp
    jmp boot_common

    .globl pvh_start
pvh_start:                           /* PVH: ebx = hvm_start_info */
    cli
    movl $0x336ec578, %esi
    movl %ebx, %ebp
boot_common:
    /* Neither protocol promises a GDT we may keep using: load our own. */
    lgdt gdt_desc
    ljmp $0x08, $1f
1:  movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    /* Zero .bss before any C runs; the stack is in its own section. */
    cld
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb
    movl $stack_top, %esp
    pushl %ebp
    pushl %esi
    call kmain
2:  hlt
    jmp 2b

    .section .rodata
    .align 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff         /* 0x08: flat 32-bit code */
    .quad 0x00cf92000000ffff         /* 0x10: flat 32-bit data */
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt

    .section .stack, "aw", @nobits
    .align 16
    .space 65536
stack_top:
    .section .note.GNU-stack, "", @progbits
