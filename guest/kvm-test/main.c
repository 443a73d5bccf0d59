/* The KVM test guest: enumerate PCI bus 0, check the host bridge's fallbacks, run the storage
 * tests for every NVMe, AHCI and virtio-blk function found, report on COM1 and exit through the test device.
 * Output lines start with KVMTEST:, PCI:, NVME:, AHCI: or VIRTIO:; the last one is KVMTEST: PASS or FAIL. */
#include "lib.h"

#define ECAM 0xe0000000UL

/* Route IOAPIC pin `gsi` to `vec` on LAPIC 0: fixed, edge, active high, unmasked. */
static void ioapic_route(u32 gsi, u8 vec)
{
    wr32(0xfec00000UL, 0x10 + 2 * gsi + 1);
    wr32(0xfec00010UL, 0); /* destination APIC ID 0 */
    wr32(0xfec00000UL, 0x10 + 2 * gsi);
    wr32(0xfec00010UL, vec);
}

/* Ways to end the VM other than the test device (after the device tests), each with its own
 * rhyve exit code. */
static void lifecycle(void)
{
    if (has_arg("action=poweroff")) {
        puts("KVMTEST: powering off\n");
        outb(0x600, (5 << 2) | 0x20); /* ACPI sleep control: SLP_TYP=S5, SLP_EN */
    } else if (has_arg("action=reboot")) {
        puts("KVMTEST: rebooting\n");
        outb(0x64, 0xfe); /* i8042: pulse reset */
    } else if (has_arg("action=reset-acpi")) {
        puts("KVMTEST: ACPI reset register\n");
        outb(0x602, 6); /* the FADT's RESET_REG and RESET_VALUE */
    } else if (has_arg("action=reset-cf9")) {
        puts("KVMTEST: reset control register\n");
        /* KVM buffers this write with CONFIG_ADDRESS's; it takes effect at the next exit,
         * which the read of the 8042 status is. */
        outb(0xcf9, 6);
        (void)inb(0x64);
    } else if (has_arg("action=triplefault")) {
        puts("KVMTEST: triple fault\n");
        struct {
            u16 limit;
            u64 base;
        } __attribute__((packed)) none = {0, 0};
        __asm__ volatile("lidt %0" ::"m"(none));
        (void)rd32(0x8000000000000000UL); /* #GP with no IDT: #DF, then shutdown */
    } else if (has_arg("action=badinsn")) {
        puts("KVMTEST: int3\n");
        __asm__ volatile("int3"); /* KVM's emulator lacks it: internal error without VT-x */
    } else if (has_arg("action=tick")) {
        /* A line per watchdog tick (about 0.27 s), for ever: shows whether the vCPU runs. */
        for (u64 n = 0;; n++) {
            u32 t = ticks;
            while (ticks == t)
                __asm__ volatile("sti; hlt; cli");
            puts("KVMTEST: tick ");
            putdec(n);
            putc('\n');
        }
    } else if (has_arg("action=powerbutton")) {
        /* The ACPI power button: the Generic Event Device interrupts on GSI 9 (the DSDT says
         * so); answer it the way an OS does, with S5. */
        ioapic_route(9, VEC_MSIX0 + 3);
        u32 seen = irq_count[3];
        puts("KVMTEST: waiting for the power button\n");
        while (irq_count[3] == seen)
            __asm__ volatile("sti; hlt; cli");
        puts("KVMTEST: power button pressed, powering off\n");
        outb(0x600, (5 << 2) | 0x20);
    } else if (has_arg("action=spin")) {
        puts("KVMTEST: spinning\n");
        for (;;)
            __asm__ volatile("sti; hlt; cli");
    } else {
        return;
    }
    for (;;)
        __asm__ volatile("sti; hlt; cli");
}

static void putmem(u64 a, u64 n)
{
    for (u64 i = 0; i < n; i++) {
        u8 c = rd8(a + i);
        putc(c >= 0x20 && c < 0x7f ? (char)c : '.');
    }
}

/* PVH flavour: report what hvm_start_info holds (start.S already checked the basics). */
static void pvh_report(void)
{
    u64 si = pvh_start_info;
    say("PVH: start_info at ", si);
    say("PVH: entry checks failed ", pvh_bad);
    if (pvh_bad)
        fail("PVH start_info checks failed", pvh_bad);
    puts("PVH: magic ");
    puthex(rd32(si));
    puts(" version ");
    putdec(rd32(si + 4));
    putc('\n');
    puts("PVH: cmdline '");
    puts(cmdline());
    puts("'\n");
    u64 map = rd64(si + 40), n = rd32(si + 48), ram = 0, top = 0;
    puts("PVH: memmap entries ");
    putdec(n);
    putc('\n');
    for (u64 i = 0; i < n; i++) {
        u64 e = map + 24 * i, addr = rd64(e), size = rd64(e + 8);
        u32 type = rd32(e + 16);
        puts("PVH: memmap ");
        puthex(addr);
        putc(' ');
        puthex(size);
        putc(' ');
        putdec(type);
        putc('\n');
        if (type == 1) {
            ram += size;
            if (addr + size > top)
                top = addr + size;
        }
    }
    puts("PVH: memmap ram bytes ");
    putdec(ram);
    puts(" top ");
    puthex(top);
    putc('\n');
    u32 nmod = rd32(si + 12);
    u64 mods = rd64(si + 16);
    puts("PVH: modules ");
    putdec(nmod);
    putc('\n');
    for (u32 i = 0; i < nmod; i++) {
        u64 m = mods + 32 * (u64)i, size = rd64(m + 8);
        puts("PVH: module ");
        putdec(i);
        puts(" size ");
        putdec(size);
        puts(" head '");
        putmem(rd64(m), size < 16 ? size : 16);
        puts("'\n");
    }
    u64 rsdp = rd64(si + 32);
    puts("PVH: rsdp ");
    puthex(rsdp);
    puts(" '");
    if (rsdp)
        putmem(rsdp, 8);
    puts("'\n");
    if (!rsdp || rd32(rsdp) != 0x20445352 || rd32(rsdp + 4) != 0x20525450) /* "RSD PTR " */
        fail("PVH rsdp_paddr does not point at an RSDP", rsdp);
    puts("PVH: OK\n");
}

void guest_main(void)
{
    puts("KVMTEST: start\n");
    if (pvh_start_info)
        pvh_report();
    idt_init();
    lapic_init();
    int failures = 0, tested = 0;
    /* rounds=N: set every device up and test it N times, with a new pattern each round (the
     * snapshot tests take the VM away in the middle). */
    u64 rounds = arg_num("rounds=", 1);
    for (u64 round = 0; round < rounds; round++) {
    pattern_salt = (u32)round * 0x5b;
    pci_reset_window();
    tested = 0;
    for (u8 dev = 0; dev < 32; dev++) {
        u32 id = pci_rd32(dev, 0, 0);
        if ((id & 0xffff) == 0xffff)
            continue;
        struct pcidev p;
        memset(&p, 0, sizeof(p));
        p.dev = dev;
        p.class = pci_rd32(dev, 0, 8) >> 8;
        puts("PCI: 0:");
        putdec(dev);
        puts(".0 id ");
        puthex(id);
        puts(" class ");
        puthex(p.class);
        putc('\n');
        /* ECAM must show the same function. */
        if (rd32(ECAM + ((u64)dev << 15)) != id)
            fail("ECAM and CF8/CFC disagree", dev);
        if (p.class == 0x010802) {
            pci_setup(&p);
            failures += nvme_test(&p);
            tested++;
        } else if (p.class == 0x010601) {
            pci_setup(&p);
            failures += ahci_test(&p);
            tested++;
        } else if (id == 0x10421af4) {
            pci_setup(&p);
            failures += virtio_test(&p);
            tested++;
        }
    }
    if (rounds > 1) {
        puts("KVMTEST: round ");
        putdec(round + 1);
        puts(" of ");
        putdec(rounds);
        putc('\n');
    }
    }
    /* Unclaimed addresses in the PCI hole read as all-ones. */
    if (rd32(0xdff00000UL) != 0xffffffff)
        fail("unclaimed MMIO did not read all-ones", rd32(0xdff00000UL));
    if (pci_rd32(31, 7, 0) != 0xffffffff)
        fail("absent function did not read all-ones", 0);
    puts("KVMTEST: devices tested ");
    putdec((u64)tested);
    putc('\n');
    if (failures)
        finish(1);
    lifecycle(); /* returns only without an action= argument */
    finish(!tested);
}
