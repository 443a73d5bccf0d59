/* AHCI end to end on the first implemented port: HBA reset, COMRESET, IDENTIFY DEVICE,
 * WRITE/READ DMA EXT (phase 3) and a batch of WRITE/READ FPDMA QUEUED (phase 4), all waiting for
 * the controller's MSI before looking at the result. */
#include "lib.h"

#define VEC_AHCI 2 /* irq_count index; vector VEC_MSIX0 + 2 */

#define CLB 0x500000UL   /* command list: 32 headers x 32 bytes */
#define FISB 0x501000UL  /* received FIS area */
#define CTBL 0x502000UL  /* command tables, 0x100 apart per slot */
#define ID 0x510000UL    /* IDENTIFY data */
#define ABUF 0x520000UL  /* data buffers, 8 KiB per slot */

#define NCMDS 8
#define SECTORS 16 /* 8 KiB per command */
#define FIRST_LBA 4096
#define NCQ_DEPTH 4

/* Port registers. */
#define PxCLB 0x00
#define PxCLBU 0x04
#define PxFB 0x08
#define PxFBU 0x0c
#define PxIS 0x10
#define PxIE 0x14
#define PxCMD 0x18
#define PxTFD 0x20
#define PxSSTS 0x28
#define PxSCTL 0x2c
#define PxSERR 0x30
#define PxSACT 0x34
#define PxCI 0x38

static u64 abar, port;
static int pno;

static u32 prd(u32 r) { return rd32(port + r); }
static void pwr(u32 r, u32 v) { wr32(port + r, v); }

/* Build the command in `slot`: H2D register FIS + one PRD of `bytes` at `buf`. */
static void build(int slot, u8 cmd, u64 lba, u16 count, u16 features, u8 dev, int write, u64 buf, u32 bytes)
{
    u64 ct = CTBL + 0x100 * (u64)slot;
    memset((void *)ct, 0, 0x100);
    u8 *f = (u8 *)ct;
    f[0] = 0x27; /* H2D register FIS */
    f[1] = 0x80; /* command */
    f[2] = cmd;
    f[3] = (u8)features;
    f[4] = (u8)lba;
    f[5] = (u8)(lba >> 8);
    f[6] = (u8)(lba >> 16);
    f[7] = dev;
    f[8] = (u8)(lba >> 24);
    f[9] = (u8)(lba >> 32);
    f[10] = (u8)(lba >> 40);
    f[11] = (u8)(features >> 8);
    f[12] = (u8)count;
    f[13] = (u8)(count >> 8);
    u32 *prdt = (u32 *)(ct + 0x80);
    prdt[0] = (u32)buf;
    prdt[1] = (u32)(buf >> 32);
    prdt[2] = 0;
    prdt[3] = (bytes - 1) | (1u << 31);
    u32 *h = (u32 *)(CLB + 32 * (u64)slot);
    h[0] = 5 | (write ? 1 << 6 : 0) | (1u << 16); /* CFL 5 dwords, W, PRDTL 1 */
    h[1] = 0;
    h[2] = (u32)ct;
    h[3] = (u32)(ct >> 32);
    mb();
}

/* Acknowledge everything the port reported; returns PxIS as it was. */
static u32 ack(void)
{
    u32 is = prd(PxIS);
    pwr(PxIS, is);
    wr32(abar + 0x08, 1u << pno);
    return is;
}

/* Issue slot 0 (non-queued), wait for its interrupt, then check it completed. */
static void issue_wait(const char *what)
{
    u32 seen = irq_count[VEC_AHCI];
    pwr(PxCI, 1);
    wait_irq(VEC_AHCI, seen, what);
    if (prd(PxCI) & 1)
        fail("AHCI interrupt before the command completed", prd(PxIS));
    u32 is = ack();
    if ((prd(PxTFD) & 0x01) || (is & (1u << 30)))
        fail(what, prd(PxTFD));
}

static void dma(int write, u64 lba, u64 buf)
{
    build(0, write ? 0x35 : 0x25, lba, SECTORS, 0, 0x40, write, buf, SECTORS * 512);
    issue_wait(write ? "AHCI WRITE DMA EXT failed" : "AHCI READ DMA EXT failed");
}

static void fill(u64 buf, u64 lba)
{
    u8 *w = (u8 *)buf;
    for (u32 b = 0; b < SECTORS; b++)
        for (u32 o = 0; o < 512; o++)
            w[b * 512 + o] = pattern(2, lba + b, o);
}

static int check(u64 buf, u64 lba)
{
    int bad = 0;
    u8 *r = (u8 *)buf;
    for (u32 b = 0; b < SECTORS; b++)
        for (u32 o = 0; o < 512; o++)
            if (r[b * 512 + o] != pattern(2, lba + b, o))
                bad++;
    return bad;
}

/* Queue NCQ_DEPTH FPDMA commands at once (tags 0..n-1) and wait until all have completed. */
static u32 ncq_batch(int write, u64 first_lba)
{
    u32 all = (1u << NCQ_DEPTH) - 1, irqs = 0;
    for (int t = 0; t < NCQ_DEPTH; t++) {
        u64 lba = first_lba + (u64)t * SECTORS;
        /* FPDMA: count in FEATURES, tag in COUNT[7:3], FUA clear, LBA mode. */
        build(t, write ? 0x61 : 0x60, lba, (u16)(t << 3), SECTORS, 0x40, write, ABUF + 0x2000 * (u64)t, SECTORS * 512);
    }
    u32 seen = irq_count[VEC_AHCI];
    for (int t = 0; t < NCQ_DEPTH; t++) { /* one tag per write, as Linux issues them */
        pwr(PxSACT, 1u << t);
        pwr(PxCI, 1u << t);
    }
    /* Every pass sleeps for at least one MSI, then acknowledges, so the next completion
     * signals again; done when the HBA has cleared all our PxSACT bits. */
    do {
        wait_irq(VEC_AHCI, seen, "timed out waiting for AHCI NCQ completions");
        irqs += irq_count[VEC_AHCI] - seen;
        seen = irq_count[VEC_AHCI];
        ack();
    } while (prd(PxSACT) & all);
    u32 is = ack();
    if ((prd(PxTFD) & 0x01) || (is & (1u << 30)))
        fail(write ? "AHCI WRITE FPDMA QUEUED failed" : "AHCI READ FPDMA QUEUED failed", prd(PxTFD));
    return irqs;
}

static void put_ata_string(u64 a, int words)
{
    for (int i = 0; i < words; i++) {
        u16 w = rd16(a + 2 * (u64)i);
        char c[2] = {(char)(w >> 8), (char)w};
        for (int k = 0; k < 2; k++)
            putc(c[k] >= 32 && c[k] < 127 ? c[k] : '?');
    }
}

static void enable_msi(struct pcidev *p)
{
    u8 c = pci_find_cap(p->dev, p->fn, 0x05);
    if (!c)
        fail("AHCI has no MSI capability", 0);
    pci_wr32(p->dev, p->fn, c + 4, 0xfee00000);
    pci_wr32(p->dev, p->fn, c + 8, 0);
    pci_wr16(p->dev, p->fn, c + 12, VEC_MSIX0 + VEC_AHCI);
    pci_wr32(p->dev, p->fn, c + 16, 0); /* unmask */
    u16 ctl = pci_rd16(p->dev, p->fn, c + 2);
    pci_wr16(p->dev, p->fn, c + 2, (ctl & ~0x70) | 1); /* one message, enable */
}

int ahci_test(struct pcidev *p)
{
    abar = p->bar[5];
    if (!abar)
        fail("AHCI BAR5 not assigned", 0);
    enable_msi(p);
    wr32(abar + 0x04, 1u << 31);           /* GHC.AE */
    wr32(abar + 0x04, (1u << 31) | 1);     /* GHC.HR */
    while (rd32(abar + 0x04) & 1)
        ;
    wr32(abar + 0x04, 1u << 31);
    u32 cap = rd32(abar), pi = rd32(abar + 0x0c);
    say("AHCI: CAP ", cap);
    say("AHCI: PI ", pi);
    say("AHCI: VS ", rd32(abar + 0x10));
    if (!pi)
        fail("AHCI has no ports", 0);
    for (pno = 0; !(pi & (1u << pno)); pno++)
        ;
    port = abar + 0x100 + 0x80 * (u64)pno;
    /* Stop the port, point it at our command list and FIS area, reset the link. */
    pwr(PxCMD, prd(PxCMD) & ~0x11u);
    while (prd(PxCMD) & 0xc000)
        ;
    pwr(PxCLB, (u32)CLB);
    pwr(PxCLBU, 0);
    pwr(PxFB, (u32)FISB);
    pwr(PxFBU, 0);
    pwr(PxSCTL, 0x301); /* COMRESET, no partial/slumber */
    pwr(PxSCTL, 0x300);
    while ((prd(PxSSTS) & 0xf) != 3)
        ;
    pwr(PxSERR, 0xffffffff);
    ack();
    pwr(PxCMD, prd(PxCMD) | 0x10); /* FRE */
    while (prd(PxTFD) & 0x88)
        ;
    pwr(PxCMD, prd(PxCMD) | 0x01); /* ST */
    pwr(PxIE, 0x7dc0007f);
    wr32(abar + 0x04, (1u << 31) | 2); /* GHC.IE */
    say("AHCI: port ready ", (u64)pno);

    build(0, 0xec, 0, 0, 0, 0, 0, ID, 512);
    issue_wait("AHCI IDENTIFY DEVICE failed");
    puts("AHCI: model '");
    put_ata_string(ID + 54, 20);
    puts("'\n");
    u64 sectors = rd64(ID + 200);
    int ncq = (cap & (1u << 30)) && (rd16(ID + 152) & (1 << 8));
    say("AHCI: sectors ", sectors);
    if (sectors < FIRST_LBA + 4 * NCMDS * SECTORS)
        fail("AHCI disk too small", sectors);

    /* Phase 3: DMA EXT, one command at a time. */
    u32 before = irq_count[VEC_AHCI];
    int bad = 0;
    testdev_begin(3);
    for (u32 c = 0; c < NCMDS; c++) {
        u64 lba = FIRST_LBA + (u64)c * SECTORS;
        fill(ABUF, lba);
        dma(1, lba, ABUF);
    }
    for (u32 c = 0; c < NCMDS; c++) {
        u64 lba = FIRST_LBA + (u64)c * SECTORS;
        memset((void *)ABUF, 0, SECTORS * 512);
        dma(0, lba, ABUF);
        bad += check(ABUF, lba);
    }
    testdev_end(2 * NCMDS);
    u32 irqs = irq_count[VEC_AHCI] - before;
    puts("AHCI: phase 3: DMA commands ");
    putdec(2 * NCMDS);
    puts(" interrupts ");
    putdec(irqs);
    puts(" mismatched bytes ");
    putdec((u64)bad);
    putc('\n');
    if (bad)
        fail("AHCI DMA data mismatch", (u64)bad);
    if (irqs != 2 * NCMDS)
        fail("AHCI interrupts differ from commands", irqs);

    /* Phase 4: NCQ, NCQ_DEPTH commands in flight at once. */
    if (!ncq)
        fail("AHCI device does not offer NCQ", cap);
    u64 nlba = FIRST_LBA + 2 * NCMDS * SECTORS;
    testdev_begin(4);
    for (int t = 0; t < NCQ_DEPTH; t++)
        fill(ABUF + 0x2000 * (u64)t, nlba + (u64)t * SECTORS);
    u32 wirqs = ncq_batch(1, nlba);
    memset((void *)ABUF, 0, 0x2000 * NCQ_DEPTH);
    u32 rirqs = ncq_batch(0, nlba);
    testdev_end(2 * NCQ_DEPTH);
    bad = 0;
    for (int t = 0; t < NCQ_DEPTH; t++)
        bad += check(ABUF + 0x2000 * (u64)t, nlba + (u64)t * SECTORS);
    puts("AHCI: phase 4: FPDMA QUEUED commands ");
    putdec(2 * NCQ_DEPTH);
    puts(" interrupts ");
    putdec(wirqs + rirqs);
    puts(" mismatched bytes ");
    putdec((u64)bad);
    putc('\n');
    if (bad)
        fail("AHCI NCQ data mismatch", (u64)bad);
    if (!wirqs || !rirqs)
        fail("AHCI NCQ completed without interrupts", wirqs);
    puts("AHCI: OK\n");
    return 0;
}
