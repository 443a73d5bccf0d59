/* The KVM test guest: enumerate PCI bus 0, check the host bridge's fallbacks, run the storage
 * tests for every NVMe and AHCI function found, report on COM1 and exit through the test device.
 * Output lines start with KVMTEST:, PCI:, NVME: or AHCI:; the last one is KVMTEST: PASS or FAIL. */
#include "lib.h"

#define ECAM 0xe0000000UL

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

void guest_main(void)
{
    puts("KVMTEST: start\n");
    idt_init();
    lapic_init();
    int failures = 0, tested = 0;
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
