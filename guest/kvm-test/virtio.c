/* virtio-blk end to end, as Linux's virtio_pci + virtio_blk do it: reset, feature negotiation,
 * split queues (as many as the device has, up to 2) on MSI-X vectors 1 and 2 (configuration
 * changes on vector 0), then a measured phase of writes of the pattern (two data descriptors
 * each) and reads compared against it, alternating between the queues, a flush and GET_ID.
 * Every wait sleeps in hlt until the queue's MSI-X interrupt arrives. */
#include "lib.h"

#define QSZ 16
#define MAXQ 2
/* Queue q's rings, and its vector (irq_count index q + 1; vector VEC_MSIX0 + q + 1). */
#define VQ_DESC(q) (0x600000UL + 0x10000UL * (q))
#define VQ_AVAIL(q) (VQ_DESC(q) + 0x1000)
#define VQ_USED(q) (VQ_DESC(q) + 0x2000)
#define VEC(q) ((q) + 1)
#define HDR 0x620000UL
#define STAT 0x620800UL
#define IDBUF 0x621000UL
#define VBUF 0x640000UL /* 8 KiB of data per request */
#define NREQ 16
#define SECTORS 16
#define FIRST_SECTOR 6144

/* Common configuration offsets (virtio 1.2 §4.1.4.3). */
#define DFSEL 0
#define DF 4
#define GFSEL 8
#define GF 12
#define CFGVEC 16
#define STATUS 20
#define QSEL 22
#define QSIZE 24
#define QVEC 26
#define QEN 28
#define QNOFF 30
#define QDESC 32
#define QDRIVER 40
#define QDEVICE 48

static u64 common, notify_base, devcfg, notify[MAXQ];
static u32 notify_mult, nq;
static u16 avail_idx[MAXQ], used_seen[MAXQ];

static void wr8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static void wr16(u64 a, u16 v) { *(volatile u16 *)a = v; }

struct desc {
    u64 addr;
    u32 len;
    u16 flags, next;
};

/* One request: header, data buffers (n of them), status byte; returns the status. */
static u8 request(u32 q, u32 type, u64 sector, const u64 *bufs, const u32 *lens, int n, int to_guest)
{
    volatile struct desc *d = (volatile struct desc *)VQ_DESC(q);
    wr32(HDR, type);
    wr32(HDR + 4, 0);
    wr64(HDR + 8, sector);
    wr8(STAT, 0xff);
    d[0].addr = HDR;
    d[0].len = 16;
    d[0].flags = 1;
    d[0].next = 1;
    for (int i = 0; i < n; i++) {
        d[1 + i].addr = bufs[i];
        d[1 + i].len = lens[i];
        d[1 + i].flags = (u16)(1 | (to_guest ? 2 : 0));
        d[1 + i].next = (u16)(2 + i);
    }
    d[1 + n].addr = STAT;
    d[1 + n].len = 1;
    d[1 + n].flags = 2;
    d[1 + n].next = 0;
    wr16(VQ_AVAIL(q) + 4 + 2 * (u64)(avail_idx[q] % QSZ), 0);
    mb();
    avail_idx[q]++;
    wr16(VQ_AVAIL(q) + 2, avail_idx[q]);
    mb();
    u32 seen = irq_count[VEC(q)];
    wr16(notify[q], (u16)q);
    wait_irq(VEC(q), seen, "timed out waiting for a virtio-blk interrupt");
    cbar();
    if (rd16(VQ_USED(q) + 2) != (u16)(used_seen[q] + 1))
        fail("virtio-blk interrupt without one used buffer", rd16(VQ_USED(q) + 2));
    if (rd32(VQ_USED(q) + 4 + 8 * (u64)(used_seen[q] % QSZ)) != 0)
        fail("virtio-blk used an unexpected head", rd32(VQ_USED(q) + 4));
    used_seen[q]++;
    return rd8(STAT);
}

static void io_phase(u32 phase)
{
    u32 before = irq_count[VEC(0)] + irq_count[VEC(1)];
    int bad = 0;
    u64 bufs[2] = {VBUF, VBUF + 4096};
    u32 lens[2] = {4096, 4096};
    testdev_begin(phase);
    for (u32 c = 0; c < NREQ; c++) {
        u64 s = FIRST_SECTOR + (u64)c * SECTORS;
        u8 *w = (u8 *)VBUF;
        for (u32 b = 0; b < SECTORS; b++)
            for (u32 o = 0; o < 512; o++)
                w[b * 512 + o] = pattern(3, s + b, o);
        if (request(c % nq, 1, s, bufs, lens, 2, 0))
            fail("virtio-blk write failed", c);
    }
    for (u32 c = 0; c < NREQ; c++) {
        u64 s = FIRST_SECTOR + (u64)c * SECTORS;
        memset((void *)VBUF, 0, SECTORS * 512);
        if (request((c + 1) % nq, 0, s, bufs, lens, 2, 1))
            fail("virtio-blk read failed", c);
        u8 *r = (u8 *)VBUF;
        for (u32 b = 0; b < SECTORS; b++)
            for (u32 o = 0; o < 512; o++)
                if (r[b * 512 + o] != pattern(3, s + b, o))
                    bad++;
    }
    testdev_end(2 * NREQ);
    u32 irqs = irq_count[VEC(0)] + irq_count[VEC(1)] - before;
    puts("VIRTIO: phase ");
    putdec(phase);
    puts(": queues ");
    putdec(nq);
    puts(" requests ");
    putdec(2 * NREQ);
    puts(" interrupts ");
    putdec(irqs);
    puts(" mismatched bytes ");
    putdec((u64)bad);
    putc('\n');
    if (bad)
        fail("virtio-blk data mismatch", (u64)bad);
    if (irqs != 2 * NREQ)
        fail("virtio-blk interrupts differ from requests", irqs);
}

int virtio_test(struct pcidev *p)
{
    /* Find the structures through the vendor capabilities. */
    for (u8 c = (u8)pci_rd32(p->dev, p->fn, 0x34); c; c = (u8)(pci_rd32(p->dev, p->fn, c) >> 8)) {
        u32 w0 = pci_rd32(p->dev, p->fn, c);
        if ((w0 & 0xff) != 0x09)
            continue;
        u8 type = (u8)(w0 >> 24), bar = (u8)pci_rd32(p->dev, p->fn, (u8)(c + 4));
        u64 at = p->bar[bar] + pci_rd32(p->dev, p->fn, (u8)(c + 8));
        if (type == 1)
            common = at;
        else if (type == 2) {
            notify_base = at;
            notify_mult = pci_rd32(p->dev, p->fn, (u8)(c + 16));
        } else if (type == 4)
            devcfg = at;
    }
    if (!common || !notify_base || !devcfg)
        fail("virtio-blk capabilities missing", 0);
    pci_enable_msix(p, MAXQ + 1);
    wr8(common + STATUS, 0);
    while (rd8(common + STATUS))
        ;
    wr8(common + STATUS, 1);
    wr8(common + STATUS, 3);
    wr32(common + DFSEL, 1);
    if (!(rd32(common + DF) & 1))
        fail("virtio-blk does not offer VERSION_1", rd32(common + DF));
    wr32(common + DFSEL, 0);
    u32 f = rd32(common + DF);
    say("VIRTIO: features ", f);
    wr32(common + GFSEL, 0);
    wr32(common + GF, f & (1u << 9)); /* FLUSH only: no EVENT_IDX, one interrupt per request */
    wr32(common + GFSEL, 1);
    wr32(common + GF, 1);
    wr8(common + STATUS, 11);
    if (rd8(common + STATUS) != 11)
        fail("virtio-blk refused the features", rd8(common + STATUS));
    wr16(common + CFGVEC, 0);
    nq = rd16(common + 18); /* num_queues */
    if (nq > MAXQ)
        nq = MAXQ;
    for (u32 q = 0; q < nq; q++) {
        /* A reset empties the device's rings: start ours from 0 in clean memory (an earlier
         * round, rounds=N, left indexes and entries behind). */
        avail_idx[q] = used_seen[q] = 0;
        memset((void *)VQ_DESC(q), 0, 0x3000);
        wr16(common + QSEL, (u16)q);
        wr16(common + QSIZE, QSZ);
        wr16(common + QVEC, (u16)VEC(q));
        if (rd16(common + QVEC) != VEC(q))
            fail("virtio-blk refused the queue vector", rd16(common + QVEC));
        wr64(common + QDESC, VQ_DESC(q));
        wr64(common + QDRIVER, VQ_AVAIL(q));
        wr64(common + QDEVICE, VQ_USED(q));
        wr16(common + QEN, 1);
        notify[q] = notify_base + (u64)rd16(common + QNOFF) * notify_mult;
    }
    wr8(common + STATUS, 15);
    say("VIRTIO: capacity sectors ", rd64(devcfg));
    if (rd64(devcfg) < FIRST_SECTOR + NREQ * SECTORS)
        fail("virtio-blk disk too small", rd64(devcfg));
    io_phase(5);
    if (request(0, 4, 0, NULL, NULL, 0, 0))
        fail("virtio-blk flush failed", 0);
    u64 idb[1] = {IDBUF};
    u32 idl[1] = {20};
    if (request(nq - 1, 8, 0, idb, idl, 1, 1))
        fail("virtio-blk GET_ID failed", 0);
    puts("VIRTIO: id '");
    for (int i = 0; i < 20 && rd8(IDBUF + (u64)i); i++)
        putc((char)rd8(IDBUF + (u64)i));
    puts("'\nVIRTIO: OK\n");
    return 0;
}
