/* Entry, stack, IDT stubs for the KVM test guest.
 *
 * rhyve enters in 64-bit mode with flat segments (CS 0x10) and 0-4 GiB identity-mapped.
 * Interrupt stubs save the caller-saved registers, call irq_handler(vector) in C and return with
 * iretq. No SSE/x87 anywhere: this runs in KVM's instruction emulator on hosts without VT-x. */
    .section .text.start, "ax"
    .globl _start
_start:
    cli
    lea     stack_top(%rip), %rsp
    xor     %ebp, %ebp
    call    guest_main
1:  hlt
    jmp     1b

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
