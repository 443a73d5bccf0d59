/* NVMe end to end: reset, admin queue, Identify, (shadow doorbells if offered), one I/O queue
 * pair on MSI-X vector 1, write a pattern, read it back, compare. Every wait sleeps in hlt until
 * the completion's MSI-X interrupt arrives. */
#include "lib.h"

#define QSIZE 16
#define NCMDS 16         /* writes, then as many reads */
#define BLOCKS_PER_CMD 16 /* 8 KiB with 512-byte blocks: PRP1 + PRP2 */
#define START_LBA 2048

/* Guest-physical buffers (identity mapped, zeroed at boot). */
#define ASQ 0x400000UL
#define ACQ 0x401000UL
#define IOSQ 0x402000UL
#define IOCQ 0x403000UL
#define IDBUF 0x404000UL
#define SHADOW 0x405000UL
#define EVENTIDX 0x406000UL
#define WBUF 0x410000UL
#define RBUF 0x420000UL

struct sqe {
    u32 cdw0, nsid, cdw2, cdw3;
    u64 mptr, prp1, prp2;
    u32 cdw10, cdw11, cdw12, cdw13, cdw14, cdw15;
};

struct queue {
    u16 qid, sqt, cqh, phase, cid;
    u64 sq, cq;
    int vec;
};

static u64 bar0;
static u32 dstrd;
static int dbbuf;

static u64 sq_db(u16 qid) { return bar0 + 0x1000 + (2 * (u64)qid) * (4UL << dstrd); }
static u64 cq_db(u16 qid) { return bar0 + 0x1000 + (2 * (u64)qid + 1) * (4UL << dstrd); }

/* Linux's nvme_dbbuf_need_event(). */
static int need_event(u16 event_idx, u16 new_idx, u16 old)
{
    return (u16)(new_idx - event_idx - 1) < (u16)(new_idx - old);
}

/* Ring a doorbell: through the shadow buffer when enabled (I/O queues only), else MMIO. */
static void ring(u16 qid, int is_cq, u16 value)
{
    u64 mmio = is_cq ? cq_db(qid) : sq_db(qid);
    if (dbbuf && qid) {
        u64 off = (2 * (u64)qid + (u64)is_cq) * (4UL << dstrd);
        volatile u32 *db = (volatile u32 *)(SHADOW + off);
        volatile u32 *ei = (volatile u32 *)(EVENTIDX + off);
        u16 old = (u16)*db;
        *db = value;
        mb();
        if (!need_event((u16)*ei, value, old))
            return;
    }
    wr32(mmio, value);
}

static u16 submit(struct queue *q, struct sqe *e)
{
    u16 cid = q->cid++;
    e->cdw0 = (e->cdw0 & 0xffff) | ((u32)cid << 16);
    memcpy((void *)(q->sq + 64 * (u64)q->sqt), e, sizeof(*e));
    q->sqt = (u16)((q->sqt + 1) % QSIZE);
    mb();
    ring(q->qid, 0, q->sqt);
    return cid;
}

/* Wait for the completion's interrupt, then take the completion (0 = success). One command is
 * outstanding at a time, so every command must raise exactly one MSI-X message: the handler count
 * proves interrupt delivery, not polling. */
static u32 complete(struct queue *q, u32 seen, u16 cid, u32 *dw0)
{
    volatile u32 *cqe = (volatile u32 *)(q->cq + 16 * (u64)q->cqh);
    wait_irq(q->vec, seen, "timed out waiting for an NVMe interrupt");
    if (((cqe[3] >> 16) & 1) != q->phase)
        fail("NVMe interrupt without a completion", q->qid);
    cbar();
    u32 status = (cqe[3] >> 17) & 0x7fff;
    if ((cqe[3] & 0xffff) != cid)
        fail("NVMe completion for an unexpected CID", cqe[3]);
    if (dw0)
        *dw0 = cqe[0];
    q->cqh = (u16)(q->cqh + 1);
    if (q->cqh == QSIZE) {
        q->cqh = 0;
        q->phase ^= 1;
    }
    ring(q->qid, 1, q->cqh);
    return status;
}

static u32 cmd(struct queue *q, struct sqe *e, u32 *dw0)
{
    u32 seen = irq_count[q->vec];
    u16 cid = submit(q, e);
    return complete(q, seen, cid, dw0);
}

static struct queue aq = {0, 0, 0, 1, 0, ASQ, ACQ, 0};
static struct queue ioq = {1, 0, 0, 1, 0, IOSQ, IOCQ, 1};

static u32 admin_cmds;

static void admin(u8 opc, u32 nsid, u64 prp1, u64 prp2, u32 c10, u32 c11, const char *what)
{
    struct sqe e;
    memset(&e, 0, sizeof(e));
    e.cdw0 = opc;
    e.nsid = nsid;
    e.prp1 = prp1;
    e.prp2 = prp2;
    e.cdw10 = c10;
    e.cdw11 = c11;
    u32 st = cmd(&aq, &e, NULL);
    admin_cmds++;
    if (st)
        fail(what, st);
}

static void put_ascii(u64 a, int n)
{
    for (int i = 0; i < n; i++) {
        char c = (char)rd8(a + (u64)i);
        putc(c >= 32 && c < 127 ? c : '?');
    }
}

static u32 io(u8 opc, u64 lba, u64 buf)
{
    struct sqe e;
    memset(&e, 0, sizeof(e));
    e.cdw0 = opc;
    e.nsid = 1;
    e.prp1 = buf;
    e.prp2 = buf + 4096;
    e.cdw10 = (u32)lba;
    e.cdw11 = (u32)(lba >> 32);
    e.cdw12 = BLOCKS_PER_CMD - 1;
    return cmd(&ioq, &e, NULL);
}

/* One measured phase: NCMDS writes of the pattern, then NCMDS reads compared against it. Only
 * doorbells may reach rhyve in here (no printing between the markers). */
static void io_phase(u32 phase, u64 first_lba)
{
    u32 before = irq_count[1];
    int bad = 0;
    testdev_begin(phase);
    for (u32 c = 0; c < NCMDS; c++) {
        u64 lba = first_lba + (u64)c * BLOCKS_PER_CMD;
        u8 *w = (u8 *)WBUF;
        for (u32 b = 0; b < BLOCKS_PER_CMD; b++)
            for (u32 o = 0; o < 512; o++)
                w[b * 512 + o] = pattern(1, lba + b, o);
        if (io(0x01, lba, WBUF))
            fail("NVMe write failed", c);
    }
    for (u32 c = 0; c < NCMDS; c++) {
        u64 lba = first_lba + (u64)c * BLOCKS_PER_CMD;
        memset((void *)RBUF, 0, BLOCKS_PER_CMD * 512);
        if (io(0x02, lba, RBUF))
            fail("NVMe read failed", c);
        u8 *r = (u8 *)RBUF;
        for (u32 b = 0; b < BLOCKS_PER_CMD; b++)
            for (u32 o = 0; o < 512; o++)
                if (r[b * 512 + o] != pattern(1, lba + b, o))
                    bad++;
    }
    testdev_end(2 * NCMDS);
    u32 irqs = irq_count[1] - before;
    puts("NVME: phase ");
    putdec(phase);
    puts(": I/O commands ");
    putdec(2 * NCMDS);
    puts(" interrupts ");
    putdec(irqs);
    puts(" mismatched bytes ");
    putdec((u64)bad);
    putc('\n');
    if (bad)
        fail("NVMe data mismatch", (u64)bad);
    if (irqs != 2 * NCMDS)
        fail("NVMe I/O interrupts differ from commands", irqs);
}

int nvme_test(struct pcidev *p)
{
    bar0 = p->bar[0];
    if (!bar0)
        fail("NVMe BAR0 not assigned", 0);
    pci_enable_msix(p, 2);
    u64 cap = rd64(bar0);
    dstrd = (u32)(cap >> 32) & 0xf;
    say("NVME: CAP ", cap);
    say("NVME: VS ", rd32(bar0 + 8));
    /* Reset, then enable with a 16-entry admin queue. */
    wr32(bar0 + 0x14, 0);
    while (rd32(bar0 + 0x1c) & 1)
        ;
    /* A reset empties the controller's queues: start ours from entry 0 with clean memory (an
     * earlier round, rounds=N, left entries, phase tags and shadow doorbell values behind). */
    aq.sqt = aq.cqh = ioq.sqt = ioq.cqh = 0;
    aq.phase = ioq.phase = 1;
    dbbuf = 0;
    memset((void *)ASQ, 0, 4 * 4096); /* ASQ, ACQ, IOSQ, IOCQ */
    memset((void *)SHADOW, 0, 2 * 4096);
    wr32(bar0 + 0x24, ((QSIZE - 1) << 16) | (QSIZE - 1));
    wr64(bar0 + 0x28, ASQ);
    wr64(bar0 + 0x30, ACQ);
    wr32(bar0 + 0x14, (4 << 20) | (6 << 16) | 1); /* IOCQES 16, IOSQES 64, EN */
    while (!(rd32(bar0 + 0x1c) & 1))
        if (rd32(bar0 + 0x1c) & 2)
            fail("NVMe controller fatal status", rd32(bar0 + 0x1c));
    puts("NVME: controller ready\n");

    admin(0x06, 0, IDBUF, 0, 1, 0, "Identify Controller failed");
    puts("NVME: model '");
    put_ascii(IDBUF + 24, 40);
    puts("' serial '");
    put_ascii(IDBUF + 4, 20);
    puts("'\n");
    u16 oacs = rd16(IDBUF + 256);
    say("NVME: OACS ", oacs);
    admin(0x06, 1, IDBUF, 0, 0, 0, "Identify Namespace failed");
    u64 nsze = rd64(IDBUF);
    u8 flbas = rd8(IDBUF + 26) & 0xf;
    u32 lbads = (rd32(IDBUF + 128 + 4 * (u64)flbas) >> 16) & 0xff;
    say("NVME: namespace 1 blocks ", nsze);
    say("NVME: LBA data size shift ", lbads);
    if (lbads != 9)
        fail("test expects 512-byte blocks", lbads);
    if (nsze < START_LBA + 4 * NCMDS * BLOCKS_PER_CMD)
        fail("namespace too small", nsze);

    admin(0x09, 0, 0, 0, 7, 0, "Set Features (Number of Queues) failed");
    if ((oacs & (1 << 8)) && !has_arg("nodbbuf")) {
        admin(0x7c, 0, SHADOW, EVENTIDX, 0, 0, "Doorbell Buffer Config failed");
        dbbuf = 1;
        puts("NVME: shadow doorbells on\n");
    } else {
        puts("NVME: shadow doorbells not offered\n");
    }
    admin(0x05, 0, IOCQ, 0, ((QSIZE - 1) << 16) | 1, (1 << 16) | 3, "Create I/O CQ failed");
    admin(0x01, 0, IOSQ, 0, ((QSIZE - 1) << 16) | 1, (1 << 16) | 1, "Create I/O SQ failed");

    u32 admin_irqs = irq_count[0];
    if (admin_irqs != admin_cmds)
        fail("NVMe admin interrupts differ from commands", admin_irqs);
    say("NVME: admin interrupts ", admin_irqs);
    io_phase(1, START_LBA);
    /* Move BAR0 while the queues live: rhyve must move the doorbells' ioeventfds with it. */
    u16 cmd = pci_rd16(p->dev, p->fn, 0x04);
    pci_wr16(p->dev, p->fn, 0x04, cmd & ~0x2);
    u64 moved = bar0 + 0x100000;
    pci_wr32(p->dev, p->fn, 0x10, (u32)moved | (pci_rd32(p->dev, p->fn, 0x10) & 0xf));
    pci_wr32(p->dev, p->fn, 0x14, (u32)(moved >> 32));
    pci_wr16(p->dev, p->fn, 0x04, cmd);
    if (rd32(bar0 + 8) != 0xffffffff || rd32(moved + 8) != 0x20000)
        fail("NVMe BAR0 did not move", moved);
    bar0 = moved;
    say("NVME: BAR0 moved to ", moved);
    io_phase(2, START_LBA + 2 * NCMDS * BLOCKS_PER_CMD);
    puts("NVME: OK\n");
    return 0;
}
