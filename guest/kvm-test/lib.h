/* Freestanding helpers for the KVM test guest: port and MMIO access, COM1 output, the rhyve test
 * device, the IDT, LAPIC and a tick watchdog. General-purpose registers only (no SSE/x87). */
#ifndef KVMTEST_LIB_H
#define KVMTEST_LIB_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define NULL ((void *)0)

/* rhyve test device (--testdev). */
#define TESTDEV_BEGIN 0xf0
#define TESTDEV_END 0xf4
#define TESTDEV_EXIT 0xfc

/* Interrupt vectors. */
#define VEC_TIMER 0x30
#define VEC_MSIX0 0x40 /* MSI-X entry n uses VEC_MSIX0 + n */
#define VEC_SPURIOUS 0xff
#define NVEC 4

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline u32 rd32(u64 a) { return *(volatile u32 *)a; }
static inline void wr32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline u16 rd16(u64 a) { return *(volatile u16 *)a; }
static inline u8 rd8(u64 a) { return *(volatile u8 *)a; }
static inline u64 rd64(u64 a) { return (u64)rd32(a) | ((u64)rd32(a + 4) << 32); }
static inline void wr64(u64 a, u64 v) { wr32(a, (u32)v); wr32(a + 4, (u32)(v >> 32)); }

/* Full barrier without SSE2's mfence (KVM's emulator lacks it): a locked add. */
static inline void mb(void) { __asm__ volatile("lock addl $0, (%%rsp)" ::: "memory", "cc"); }
static inline void cbar(void) { __asm__ volatile("" ::: "memory"); }

void *memset(void *d, int c, u64 n);
void *memcpy(void *d, const void *s, u64 n);

void putc(char c);
void puts(const char *s);
void puthex(u64 v);
void putdec(u64 v);
void say(const char *a, u64 v); /* "a" v-in-hex newline */

void testdev_begin(u32 phase);
void testdev_end(u32 ios);
void finish(int status) __attribute__((noreturn));
void fail(const char *why, u64 v) __attribute__((noreturn));

/* Interrupts. */
extern volatile u32 irq_count[NVEC];
extern volatile u32 ticks;
void idt_init(void);
void lapic_init(void);
/* Sleep (sti; hlt) until irq_count[v] != seen; fails after `limit` watchdog ticks. */
void wait_irq(int v, u32 seen, const char *what);

/* PCI config space through 0xCF8/0xCFC (bus 0). */
u32 pci_rd32(u8 dev, u8 fn, u8 off);
void pci_wr32(u8 dev, u8 fn, u8 off, u32 v);
u16 pci_rd16(u8 dev, u8 fn, u8 off);
void pci_wr16(u8 dev, u8 fn, u8 off, u16 v);
u8 pci_find_cap(u8 dev, u8 fn, u8 id);

/* A PCI function as the guest set it up. */
struct pcidev {
    u8 dev, fn;
    u32 class; /* class << 16 | subclass << 8 | prog-if */
    u64 bar[6];
    u64 barsz[6];
};
/* Size and program every BAR from the guest's own window, then enable memory + bus mastering. */
void pci_setup(struct pcidev *p);
/* Program MSI-X entries 0..n-1 to VEC_MSIX0+i on LAPIC 0 and enable MSI-X. */
void pci_enable_msix(struct pcidev *p, int n);

/* The kernel command line: from hvm_start_info (PVH flavour) or the zero page (NULL if none). */
const char *cmdline(void);
/* Does the kernel command line contain the word `w`? */
int has_arg(const char *w);
/* The decimal value of `key` (e.g. "rounds=") on the command line, or `dflt`. */
u64 arg_num(const char *key, u64 dflt);
/* Place BARs from the start of the guest's window again (each round sets devices up anew). */
void pci_reset_window(void);

/* PVH flavour: EBX at the 32-bit entry (0 when entered through the 64-bit protocol) and the
 * checks start.S found failing (bits: 1 magic, 2 version, 4 memmap, 8 cmdline, 16 CPU mode). */
extern u32 pvh_start_info, pvh_bad;

int nvme_test(struct pcidev *p);
int ahci_test(struct pcidev *p);
int virtio_test(struct pcidev *p);

/* Changes the pattern from round to round (`rounds=N`); 0 in the first. */
extern u32 pattern_salt;

/* The pattern every test writes: depends on device, LBA, byte offset and the round. */
static inline u8 pattern(u32 dev, u64 lba, u32 off)
{
    u32 x = (u32)(lba * 2654435761u) ^ (dev << 24) ^ (off * 40503u);
    return (u8)(x ^ (x >> 11) ^ (x >> 19) ^ pattern_salt);
}

#endif
