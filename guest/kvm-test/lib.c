/* Runtime of the KVM test guest: output, test device, IDT/LAPIC, PCI enumeration and setup. */
#include "lib.h"

void *memset(void *d, int c, u64 n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, u64 n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

/* ---- COM1 ---- */

void putc(char c)
{
    if (c == '\n')
        putc('\r');
    while (!(inb(0x3f8 + 5) & 0x20))
        ;
    outb(0x3f8, (u8)c);
}

void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

void puthex(u64 v)
{
    char b[19];
    int i = 18;
    b[i] = 0;
    do {
        b[--i] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    b[--i] = 'x';
    b[--i] = '0';
    puts(&b[i]);
}

void putdec(u64 v)
{
    char b[21];
    int i = 20;
    b[i] = 0;
    do {
        b[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts(&b[i]);
}

void say(const char *a, u64 v)
{
    puts(a);
    puthex(v);
    putc('\n');
}

/* ---- test device ---- */

void testdev_begin(u32 phase) { outl(TESTDEV_BEGIN, phase); }
void testdev_end(u32 ios) { outl(TESTDEV_END, ios); }

void finish(int status)
{
    puts(status ? "KVMTEST: FAIL\n" : "KVMTEST: PASS\n");
    outl(TESTDEV_EXIT, (u32)status);
    for (;;)
        __asm__ volatile("cli; hlt");
}

void fail(const char *why, u64 v)
{
    puts("KVMTEST: error: ");
    puts(why);
    puts(" ");
    puthex(v);
    putc('\n');
    finish(1);
}

/* ---- interrupts ---- */

struct idt_entry {
    u16 off0, sel;
    u8 ist, attr;
    u16 off1;
    u32 off2, zero;
} __attribute__((packed));

static struct idt_entry idt[256] __attribute__((aligned(16)));
volatile u32 irq_count[NVEC];
volatile u32 ticks;
static u32 timer_ticks_limit = 200;

extern char isr_0x30[], isr_0x40[], isr_0x41[], isr_0x42[], isr_0x43[], isr_0xff[], isr_fault[];

#define LAPIC 0xfee00000UL

static void set_gate(int v, void *h)
{
    u64 a = (u64)h;
    idt[v].off0 = (u16)a;
    idt[v].sel = 0x10;
    idt[v].ist = 0;
    idt[v].attr = 0x8e;
    idt[v].off1 = (u16)(a >> 16);
    idt[v].off2 = (u32)(a >> 32);
    idt[v].zero = 0;
}

void idt_init(void)
{
    for (int v = 0; v < 32; v++)
        set_gate(v, isr_fault);
    set_gate(VEC_TIMER, isr_0x30);
    set_gate(VEC_MSIX0 + 0, isr_0x40);
    set_gate(VEC_MSIX0 + 1, isr_0x41);
    set_gate(VEC_MSIX0 + 2, isr_0x42);
    set_gate(VEC_MSIX0 + 3, isr_0x43);
    set_gate(VEC_SPURIOUS, isr_0xff);
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) d = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" ::"m"(d));
}

void lapic_init(void)
{
    wr32(LAPIC + 0xf0, 0x100 | VEC_SPURIOUS); /* software enable */
    wr32(LAPIC + 0x80, 0);                    /* TPR: accept everything */
    /* Watchdog: periodic timer. KVM's APIC bus runs at 1 GHz: 2^24 * 16 ns ≈ 0.27 s per tick. */
    wr32(LAPIC + 0x3e0, 0x3);                 /* divide by 16 */
    wr32(LAPIC + 0x320, (1 << 17) | VEC_TIMER); /* periodic */
    wr32(LAPIC + 0x380, 1 << 24);
}

void irq_handler(u64 vec)
{
    if (vec == 0xee)
        fail("CPU exception", vec);
    if (vec == VEC_TIMER)
        ticks++;
    else if (vec >= VEC_MSIX0 && vec < VEC_MSIX0 + NVEC)
        irq_count[vec - VEC_MSIX0]++;
    if (vec != VEC_SPURIOUS)
        wr32(LAPIC + 0xb0, 0); /* EOI */
}

void wait_irq(int v, u32 seen, const char *what)
{
    u32 start = ticks;
    while (irq_count[v] == seen) {
        __asm__ volatile("sti; hlt; cli" ::: "memory");
        if (ticks - start > timer_ticks_limit)
            fail(what, (u64)v);
    }
}

/* ---- PCI ---- */

static u32 cf8(u8 dev, u8 fn, u8 off) { return 0x80000000u | ((u32)dev << 11) | ((u32)fn << 8) | (off & 0xfc); }

u32 pci_rd32(u8 dev, u8 fn, u8 off)
{
    outl(0xcf8, cf8(dev, fn, off));
    return inl(0xcfc);
}

void pci_wr32(u8 dev, u8 fn, u8 off, u32 v)
{
    outl(0xcf8, cf8(dev, fn, off));
    outl(0xcfc, v);
}

u16 pci_rd16(u8 dev, u8 fn, u8 off)
{
    outl(0xcf8, cf8(dev, fn, off));
    return inw(0xcfc + (off & 2));
}

void pci_wr16(u8 dev, u8 fn, u8 off, u16 v)
{
    outl(0xcf8, cf8(dev, fn, off));
    outw(0xcfc + (off & 2), v);
}

u8 pci_find_cap(u8 dev, u8 fn, u8 id)
{
    if (!(pci_rd16(dev, fn, 0x06) & 0x10))
        return 0;
    u8 p = (u8)pci_rd32(dev, fn, 0x34) & 0xfc;
    for (int guard = 0; p && guard < 48; guard++) {
        u32 h = pci_rd32(dev, fn, p);
        if ((h & 0xff) == id)
            return p;
        p = (u8)(h >> 8) & 0xfc;
    }
    return 0;
}

/* The guest's own BAR window: deliberately not where rhyve put them, so BAR moves are tested. */
#define MMIO_WINDOW 0xd0000000UL
static u64 next_mmio = MMIO_WINDOW;

void pci_reset_window(void)
{
    next_mmio = MMIO_WINDOW;
}

void pci_setup(struct pcidev *p)
{
    u8 d = p->dev, f = p->fn;
    u16 cmd = pci_rd16(d, f, 0x04);
    pci_wr16(d, f, 0x04, cmd & ~0x7); /* decoding off while sizing */
    for (int i = 0; i < 6; i++) {
        u8 off = (u8)(0x10 + 4 * i);
        u32 orig = pci_rd32(d, f, off);
        pci_wr32(d, f, off, 0xffffffff);
        u32 lo = pci_rd32(d, f, off);
        pci_wr32(d, f, off, orig);
        p->bar[i] = 0;
        p->barsz[i] = 0;
        if (lo == 0)
            continue;
        if (lo & 1) /* I/O BAR: not used by these tests */
            continue;
        int is64 = ((lo >> 1) & 3) == 2;
        u64 mask = lo & ~0xfUL;
        if (is64) {
            u32 ohi = pci_rd32(d, f, off + 4);
            pci_wr32(d, f, off + 4, 0xffffffff);
            u32 hi = pci_rd32(d, f, off + 4);
            pci_wr32(d, f, off + 4, ohi);
            mask |= (u64)hi << 32;
        } else {
            mask |= 0xffffffff00000000UL;
        }
        u64 size = ~mask + 1;
        u64 base = (next_mmio + size - 1) & ~(size - 1);
        next_mmio = base + size;
        pci_wr32(d, f, off, (u32)base);
        if (is64)
            pci_wr32(d, f, off + 4, (u32)(base >> 32));
        p->bar[i] = base;
        p->barsz[i] = size;
        puts("  BAR");
        putdec((u64)i);
        puts(" size ");
        puthex(size);
        puts(" at ");
        puthex(base);
        putc('\n');
        if (is64)
            i++;
    }
    pci_wr16(d, f, 0x04, (cmd & ~0x1) | 0x2 | 0x4 | 0x400); /* memory, bus master, INTx off */
}

void pci_enable_msix(struct pcidev *p, int n)
{
    u8 c = pci_find_cap(p->dev, p->fn, 0x11);
    if (!c)
        fail("no MSI-X capability", p->class);
    u32 t = pci_rd32(p->dev, p->fn, c + 4);
    u64 table = p->bar[t & 7] + (t & ~7u);
    u16 ctrl = pci_rd16(p->dev, p->fn, c + 2);
    if ((ctrl & 0x7ff) + 1 < n)
        fail("too few MSI-X vectors", ctrl);
    /* Function-mask while programming, as drivers do. */
    pci_wr16(p->dev, p->fn, c + 2, ctrl | 0x8000 | 0x4000);
    for (int i = 0; i < n; i++) {
        u64 e = table + 16 * (u64)i;
        wr32(e + 0, 0xfee00000); /* LAPIC 0, physical */
        wr32(e + 4, 0);
        wr32(e + 8, VEC_MSIX0 + (u32)i);
        wr32(e + 12, 0); /* unmask */
    }
    pci_wr16(p->dev, p->fn, c + 2, (ctrl | 0x8000) & ~0x4000);
}

/* ---- command line ---- */

u32 pvh_start_info, pvh_bad;

const char *cmdline(void)
{
    if (pvh_start_info)
        return (const char *)rd64(pvh_start_info + 24); /* hvm_start_info.cmdline_paddr */
    return (const char *)(u64)rd32(0x7000 + 0x228); /* boot_params.hdr.cmd_line_ptr */
}

u32 pattern_salt;

u64 arg_num(const char *key, u64 dflt)
{
    const char *c = cmdline();
    if (!c)
        return dflt;
    while (*c) {
        while (*c == ' ')
            c++;
        const char *a = c, *b = key;
        while (*a && *b && *a == *b)
            a++, b++;
        if (!*b) {
            u64 v = 0;
            int digits = 0;
            while (*a >= '0' && *a <= '9')
                v = v * 10 + (u64)(*a++ - '0'), digits++;
            return digits ? v : dflt;
        }
        while (*c && *c != ' ')
            c++;
    }
    return dflt;
}

int has_arg(const char *w)
{
    const char *c = cmdline();
    if (!c)
        return 0;
    while (*c) {
        while (*c == ' ')
            c++;
        const char *a = c, *b = w;
        while (*a && *a != ' ' && *b && *a == *b)
            a++, b++;
        if (!*b && (!*a || *a == ' '))
            return 1;
        while (*c && *c != ' ')
            c++;
    }
    return 0;
}
