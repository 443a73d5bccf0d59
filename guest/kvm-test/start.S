/* Entry, stack, IDT stubs for the KVM test guest.
 *
 * rhyve enters in 64-bit mode with flat segments (CS 0x10) and 0-4 GiB identity-mapped.
 * Interrupt stubs save the caller-saved registers, call irq_handler(vector) in C and return with
 * iretq. No SSE/x87 anywhere: this runs in KVM's instruction emulator on hosts without VT-x.
 *
 * The PVH flavour (built with -DPVH) also carries a XEN_ELFNOTE_PHYS32_ENTRY note, so rhyve
 * enters it at pvh_start in 32-bit protected mode with paging off and EBX = hvm_start_info. That
 * stub checks the start info, builds its own identity map of 0-4 GiB (2 MiB pages), enables PAE
 * and long mode, loads its own GDT (the same selectors as rhyve's 64-bit GDT) and far-jumps to
 * _start. pvh_start_info and pvh_bad are defined in lib.c (zero in the 64-bit flavour). */
    .section .text.start, "ax"
    .globl _start
_start:
    cli
    lea     stack_top(%rip), %rsp
    xor     %ebp, %ebp
    call    guest_main
1:  hlt
    jmp     1b

#ifdef PVH
/* hvm_start_info offsets (xen/include/public/arch-x86/hvm/start_info.h). */
#define SI_MAGIC 0
#define SI_VERSION 4
#define SI_CMDLINE 24
#define SI_MEMMAP 40
#define SI_MEMMAP_ENTRIES 48
#define XEN_HVM_START_MAGIC 0x336ec578

/* Bits of pvh_bad (reported by main.c). */
#define BAD_MAGIC 1
#define BAD_VERSION 2
#define BAD_MEMMAP 4
#define BAD_CMDLINE 8
#define BAD_MODE 16

    .section .note.Xen, "a", @note
    .balign 4
    .long   4                   /* namesz: "Xen\0" */
    .long   4                   /* descsz */
    .long   18                  /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz  "Xen"
    .long   pvh_start

    .section .text.start, "ax"
    .code32
    .globl pvh_start
pvh_start:
    cli
    mov     %ebx, pvh_start_info
    xor     %edx, %edx          /* failed checks */
    /* Protected mode, paging off, as PVH requires. */
    mov     %cr0, %eax
    and     $0x80000001, %eax
    cmp     $1, %eax
    je      1f
    or      $BAD_MODE, %edx
1:  cmpl    $XEN_HVM_START_MAGIC, SI_MAGIC(%ebx)
    je      1f
    or      $BAD_MAGIC, %edx
1:  cmpl    $1, SI_VERSION(%ebx)
    jae     1f
    or      $BAD_VERSION, %edx
1:  cmpl    $0, SI_MEMMAP_ENTRIES(%ebx)
    je      2f
    cmpl    $0, SI_MEMMAP(%ebx)
    jne     1f
2:  or      $BAD_MEMMAP, %edx
1:  /* The command line: below 4 GiB, NUL-terminated within 4 KiB. */
    cmpl    $0, SI_CMDLINE+4(%ebx)
    jne     3f
    mov     SI_CMDLINE(%ebx), %esi
    test    %esi, %esi
    jz      3f
    mov     $4096, %ecx
2:  cmpb    $0, (%esi)
    je      1f
    inc     %esi
    dec     %ecx
    jnz     2b
3:  or      $BAD_CMDLINE, %edx
1:  mov     %edx, pvh_bad

    /* Identity map 0-4 GiB: PML4[0] -> PDPT, PDPT[0..3] -> four PDs of 2 MiB pages. */
    movl    $(pvh_pdpt + 3), pvh_pml4
    xor     %ecx, %ecx
1:  mov     %ecx, %eax
    shl     $12, %eax
    add     $(pvh_pd + 3), %eax
    mov     %eax, pvh_pdpt(,%ecx,8)
    inc     %ecx
    cmp     $4, %ecx
    jb      1b
    xor     %ecx, %ecx
1:  mov     %ecx, %eax
    shl     $21, %eax
    or      $0x83, %eax         /* present, writable, 2 MiB */
    mov     %eax, pvh_pd(,%ecx,8)
    movl    $0, pvh_pd+4(,%ecx,8)
    inc     %ecx
    cmp     $2048, %ecx
    jb      1b

    mov     %cr4, %eax
    or      $0x20, %eax         /* PAE */
    mov     %eax, %cr4
    mov     $pvh_pml4, %eax
    mov     %eax, %cr3
    mov     $0xc0000080, %ecx   /* EFER */
    rdmsr
    or      $0x100, %eax        /* LME */
    wrmsr
    lgdt    pvh_gdt_desc
    mov     %cr0, %eax
    or      $0x80000000, %eax   /* PG: long mode becomes active */
    mov     %eax, %cr0
    ljmp    $0x10, $pvh_long
    .code64
pvh_long:
    mov     $0x18, %eax
    mov     %eax, %ds
    mov     %eax, %es
    mov     %eax, %ss
    mov     %eax, %fs
    mov     %eax, %gs
    jmp     _start

    .data
    .balign 8
pvh_gdt:
    .quad   0
    .quad   0
    .quad   0x00af9b000000ffff  /* 0x10: 64-bit code */
    .quad   0x00cf93000000ffff  /* 0x18: flat data */
pvh_gdt_end:
pvh_gdt_desc:
    .word   pvh_gdt_end - pvh_gdt - 1
    .long   pvh_gdt

    .bss
    .balign 4096
pvh_pml4:
    .space  4096
pvh_pdpt:
    .space  4096
pvh_pd:
    .space  4 * 4096
#endif

    .text
/* One stub per vector: push the vector number and join the common path. */
.macro STUB n
    .globl isr_\n
isr_\n:
    push    $\n
    jmp     isr_common
.endm
    STUB 0x30
    STUB 0x40
    STUB 0x41
    STUB 0x42
    STUB 0x43
    STUB 0xff
/* Exceptions: report and stop. */
    .globl isr_fault
isr_fault:
    push    $0xee
    jmp     isr_common

isr_common:
    push    %rbx
    push    %rax
    push    %rcx
    push    %rdx
    push    %rsi
    push    %rdi
    push    %r8
    push    %r9
    push    %r10
    push    %r11
    mov     80(%rsp), %rdi      /* the vector pushed by the stub */
    mov     %rsp, %rbx          /* rbx is callee-saved: keep the frame */
    and     $-16, %rsp
    call    irq_handler
    mov     %rbx, %rsp
    pop     %r11
    pop     %r10
    pop     %r9
    pop     %r8
    pop     %rdi
    pop     %rsi
    pop     %rdx
    pop     %rcx
    pop     %rax
    pop     %rbx
    add     $8, %rsp            /* the vector */
    iretq

    .bss
    .align 16
    .space 65536
stack_top:

    .section .note.GNU-stack, "", @progbits
