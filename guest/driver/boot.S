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


/*
 * Interrupt entry stubs for vectors 0..63 and 255.  Each pushes a dummy
 * error code (the CPU pushes a real one for 8, 10-14, 17, 21, 29, 30), then
 * its vector number, and joins isr_common, which saves the general
 * registers and calls irq_dispatch(struct irq_frame *).  irq.c fills the
 * IDT from isr_table.
 */
    .section .text
.macro ISR n
    .align 8
isr_\n:
    .if (\n == 8) || ((\n >= 10) && (\n <= 14)) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
    .else
    pushl $0
    .endif
    pushl $\n
    jmp isr_common
.endm

    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    ISR \n
    .endr
    .irp n, 32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63
    ISR \n
    .endr
    ISR 255

isr_common:
    pushal
    cld
    pushl %esp                       /* struct irq_frame * */
    call irq_dispatch
    addl $4, %esp
    popal
    addl $8, %esp                    /* vector and error code */
    iret

    .section .rodata
    .align 4
    .globl isr_table
isr_table:                           /* 65 entries: vectors 0..63, then 255 */
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .long isr_\n
    .endr
    .irp n, 32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63
    .long isr_\n
    .endr
    .long isr_255

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
