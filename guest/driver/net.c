/*
 * The kernel half of the channel: moves packets between the Skywalk rings
 * (channel.c) and the device's virtqueues (virtq.c), and owns device
 * bring-up, reset, recovery, the control queue, interrupts and waiting.
 * Queue 2n is receiveq(n+1), 2n+1 transmitq(n+1), 2 * max_virtqueue_pairs
 * the control queue (5.1.2 "Virtqueues").
 *
 * One Skywalk TX ring feeds every TX queue (each frame goes to the queue
 * its flow hashes to, so a flow stays in order) and every RX queue feeds
 * the one Skywalk RX ring.
 */
#include "driver.h"

struct vdev_stats vdev_stats = {.magic = VDEV_STATS_MAGIC, .version = VDEV_STATS_VERSION};
struct vdev_info vdev_info = {.magic = VDEV_STATS_MAGIC};
struct net_opts net_opts = {.event_idx = 1, .mrg_rxbuf = 1, .force = FORCE_AUTO, .qsize = 256,
                            .mq = 1};
struct vdev_vq_info vdev_vqs[VDEV_MAX_VQS];

/* Big and initialised by vq_init: kept out of the .bss the boot code clears
 * (clearing ~2 MiB under TCG would cost boot time).  Exported so the host
 * can find the driver-private queue state too. */
#define NOINIT __attribute__((section(".noinit")))
#define VQ_MEM 32768                     /* vq_mem_size(VQ_MAX) */
struct vq vdev_rxqs[VDEV_MAX_PAIRS] NOINIT, vdev_txqs[VDEV_MAX_PAIRS] NOINIT, vdev_ctrlq NOINIT;
static uint8_t vq_mem[VDEV_MAX_VQS][VQ_MEM] __attribute__((aligned(4096), section(".noinit")));
static struct vring_desc ind_tables[VDEV_MAX_PAIRS][VQ_MAX * IND_MAX] NOINIT;
typedef char vq_mem_check[(VQ_MEM >= 20480 + 12288) ? 1 : -1];

#define CTRL_SLOT (VDEV_MAX_VQS - 1)

static int up, probed, in_restart;
static uint32_t hdr_len, npairs = 1;
static int mrg;
static uint32_t sync_count;
static uint64_t drv_features;
static volatile int cfg_pending;
static uint16_t last_status = VIRTIO_NET_S_LINK_UP;
static volatile uint32_t link_reports;   /* changes not printed yet */

int net_ready(void) { return up; }
uint32_t net_pairs(void) { return npairs; }
uint64_t net_features(void) { return drv_features; }
int net_has(int bit) { return (int)((drv_features >> bit) & 1); }

uint32_t net_tx_in_flight(void)
{
    uint32_t n = 0;
    if (up)
        for (uint32_t i = 0; i < npairs; i++)
            n += vdev_txqs[i].in_flight;
    return n;
}

void net_violation(uint64_t *counter, const char *name, uint32_t a, uint32_t b)
{
    (*counter)++;
    vdev_stats.violations++;
    kprintf("! violation %s a=%u b=%u\n", name, a, b);
}

/* A frame's flow: IPv4 addresses and L4 ports when there are some, else the
 * MAC addresses and ethertype (FNV-1a). */
uint32_t flow_hash(const uint8_t *f, uint32_t len)
{
    uint32_t h = 2166136261u, from = 0, to = len < 14 ? len : 14;
    if (len >= 34 && f[12] == 0x08 && f[13] == 0x00) {
        from = 26;
        to = len >= 38 ? 38 : 34;
    }
    for (uint32_t i = from; i < to; i++)
        h = (h ^ f[i]) * 16777619u;
    return h;
}

static void refill_rx(struct vq *q)
{
    while (q->num_free > 0 && !q->broken) {
        uint32_t b;
        if (pool_buf_alloc(&b))
            break;
        /* One writable descriptor per buffer.  5.1.6.3 "Setting Up Receive
         * Buffers": without MRG_RXBUF each buffer must hold a whole 1514-byte
         * frame plus header, which POOL_BUF_SIZE does; with MRG_RXBUF the
         * device spreads larger frames over several and says so in
         * num_buffers.  The header shares the descriptor with data: legacy
         * devices offer ANY_LAYOUT (negotiated) and VERSION_1 implies it. */
        struct vq_seg seg = {(uint32_t)(uintptr_t)buf_addr(b), POOL_BUF_SIZE, 1};
        if (vq_add(q, &seg, 1, b) < 0) {
            pool_buf_free(b);
            break;
        }
        vdev_stats.rx_refills++;
    }
}

static void clear_queue(struct vq *q)
{
    memset(q, 0, __builtin_offsetof(struct vq, next));
}

static int setup_queue(struct vq *q, uint16_t index, uint32_t slot, uint64_t *kicks,
                       uint64_t *suppressed, uint64_t *irqs, int ev, int packed,
                       struct vring_desc *ind)
{
    uint16_t max = vt_queue_max(index);
    uint16_t size = max;
    if (vdev_info.transport != VDEV_TRANSPORT_PCI_LEGACY && net_opts.qsize && net_opts.qsize < max)
        size = (uint16_t)net_opts.qsize;
    if (size == 0 || size > VQ_MAX)
        return -1;
    q->kicks = kicks;
    q->kicks_suppressed = suppressed;
    q->irqs = irqs;
    q->info = &vdev_vqs[slot];
    vq_init(q, index, size, vq_mem[slot], ev, packed, ind);
    if (irq_enabled() && vt_msix_on()) {
        /* 4.1.5.1.2: one vector per queue when there are enough, else all
         * queues share entry 1 (config keeps entry 0). */
        uint16_t want = vdev_info.irq_line >= 1u + 2u * npairs ? (uint16_t)(1 + slot) : 1;
        if (slot == CTRL_SLOT)
            want = VIRTIO_MSI_NO_VECTOR;     /* polled: QEMU completes it at once */
        uint16_t got = vt_set_queue_vector(index, want);
        q->info->msix_vector = got;
    }
    uintptr_t drv = q->packed ? (uintptr_t)q->drv_event : (uintptr_t)q->avail;
    uintptr_t dev = q->packed ? (uintptr_t)q->dev_event : (uintptr_t)q->used;
    return vt_queue_setup(index, q->size, (uintptr_t)(q->packed ? (void *)q->pdesc : (void *)q->desc),
                          drv, dev);
}

/* 5.1.6.5 Control Virtqueue: class, command, data (device-readable), ack
 * (device-writable).  QEMU keeps this queue itself even with vhost-user and
 * answers at once, so it is polled with a deadline. */
static struct {
    uint8_t cls, cmd;
    uint16_t data;
    uint8_t ack;
} ctrl_buf __attribute__((aligned(16)));

static int ctrl_cmd(uint8_t cls, uint8_t cmd, uint16_t data)
{
    struct vq *q = &vdev_ctrlq;
    ctrl_buf.cls = cls;
    ctrl_buf.cmd = cmd;
    ctrl_buf.data = data;
    ctrl_buf.ack = 0xff;
    struct vq_seg segs[3] = {{(uint32_t)(uintptr_t)&ctrl_buf.cls, 2, 0},
                             {(uint32_t)(uintptr_t)&ctrl_buf.data, 2, 0},
                             {(uint32_t)(uintptr_t)&ctrl_buf.ack, 1, 1}};
    vdev_stats.ctrl_cmds++;
    if (vq_add(q, segs, 3, 0) < 0) {
        vdev_stats.ctrl_errors++;
        return -1;
    }
    vq_publish(q);
    uint64_t dl = time_deadline(1000);
    int n;
    while ((n = vq_used_pending(q)) == 0 && !time_expired(dl))
        cpu_relax();
    uint32_t tok, len;
    if (n <= 0 || vq_peek_used(q, 0, &tok, &len)) {
        vdev_stats.ctrl_errors++;
        return -1;
    }
    vq_consume(q, 1);
    barrier();
    if (ctrl_buf.ack != VIRTIO_NET_OK) {
        vdev_stats.ctrl_errors++;
        return -1;
    }
    return 0;
}

static uint16_t link_status(void)
{
    /* 5.1.4: without VIRTIO_NET_F_STATUS the link is assumed up. */
    if (!net_has(VIRTIO_NET_F_STATUS))
        return VIRTIO_NET_S_LINK_UP;
    return vt_cfg16(6);
}

static int bringup(void)
{
    up = 0;
    if (!probed) {
        if (vt_probe(net_opts.force))
            return -1;
        probed = 1;
    }
    /* 3.1.1 Driver Requirements: Device Initialization. */
    vt_reset();
    vt_set_status(VIRTIO_STATUS_ACKNOWLEDGE);
    vt_set_status(VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    uint64_t devf = vt_device_features();
    uint64_t want = 1ULL << VIRTIO_NET_F_MAC | 1ULL << VIRTIO_NET_F_STATUS;
    if (vt_is_modern())
        want |= 1ULL << VIRTIO_F_VERSION_1;
    else
        want |= 1ULL << VIRTIO_F_ANY_LAYOUT;
    if (net_opts.mrg_rxbuf)
        want |= 1ULL << VIRTIO_NET_F_MRG_RXBUF;
    if (net_opts.event_idx)
        want |= 1ULL << VIRTIO_RING_F_EVENT_IDX;
    if (net_opts.packed)
        want |= 1ULL << VIRTIO_F_RING_PACKED;
    if (net_opts.indirect)
        want |= 1ULL << VIRTIO_RING_F_INDIRECT_DESC;
    if (net_opts.mq > 1)
        want |= 1ULL << VIRTIO_NET_F_MQ | 1ULL << VIRTIO_NET_F_CTRL_VQ;
    /* 5.1.3.1: HOST_TSO4/6 need CSUM.  GUEST_TSO is not asked for: a GSO
     * frame can be 64 KiB and a pool packet holds POOL_MAX_FRAGS buffers. */
    if (net_opts.csum || net_opts.tso)
        want |= 1ULL << VIRTIO_NET_F_CSUM | 1ULL << VIRTIO_NET_F_GUEST_CSUM;
    if (net_opts.tso)
        want |= 1ULL << VIRTIO_NET_F_HOST_TSO4 | 1ULL << VIRTIO_NET_F_HOST_TSO6;
    uint64_t drv = devf & want;
    if ((drv >> VIRTIO_NET_F_MQ & 1) && !(drv >> VIRTIO_NET_F_CTRL_VQ & 1))
        drv &= ~(1ULL << VIRTIO_NET_F_MQ); /* 5.1.3.1: MQ requires CTRL_VQ */
    vdev_info.device_features = devf;
    vdev_info.driver_features = drv;
    drv_features = drv;
    if (vt_is_modern() && !(drv & (1ULL << VIRTIO_F_VERSION_1))) {
        vt_set_status(VIRTIO_STATUS_FAILED);
        return -2;
    }
    vt_set_driver_features(drv);
    if (vt_is_modern()) {
        uint8_t st = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK;
        vt_set_status(st);
        if (!(vt_get_status() & VIRTIO_STATUS_FEATURES_OK)) {
            vt_set_status(VIRTIO_STATUS_FAILED);
            return -3;
        }
    }
    mrg = net_has(VIRTIO_NET_F_MRG_RXBUF);
    int ev = net_has(VIRTIO_RING_F_EVENT_IDX), packed = net_has(VIRTIO_F_RING_PACKED);
    int ind = net_has(VIRTIO_RING_F_INDIRECT_DESC);
    /* 5.1.6 "Device Operation": the header is 12 bytes with MRG_RXBUF or
     * VERSION_1, else the 10-byte legacy struct virtio_net_hdr. */
    hdr_len = (mrg || net_has(VIRTIO_F_VERSION_1)) ? 12 : 10;
    vdev_info.hdr_len = (uint16_t)hdr_len;
    /* Interrupts first: with MSI-X on, legacy config moves (4.1.4.8), and the
     * vectors must be in place before DRIVER_OK. */
    irq_route_nic();
    if (irq_enabled() && vt_msix_on())
        vt_set_config_vector(0);
    uint32_t maxp = net_has(VIRTIO_NET_F_MQ) ? vt_cfg16(8) : 1;
    if (maxp < 1)
        maxp = 1;
    npairs = net_opts.mq < maxp ? net_opts.mq : maxp;
    if (npairs > VDEV_MAX_PAIRS)
        npairs = VDEV_MAX_PAIRS;
    if (npairs < 1)
        npairs = 1;
    vdev_info.max_pairs = maxp;
    vdev_info.pairs = npairs;
    vdev_info.packed = (uint32_t)packed;
    vdev_info.indirect = (uint32_t)ind;
    vdev_info.csum = (uint32_t)net_has(VIRTIO_NET_F_CSUM);
    vdev_info.tso = (uint32_t)net_has(VIRTIO_NET_F_HOST_TSO4);
    memset(vdev_vqs, 0, sizeof(vdev_vqs));
    for (uint32_t i = 0; i < VDEV_MAX_PAIRS; i++) {
        clear_queue(&vdev_rxqs[i]);
        clear_queue(&vdev_txqs[i]);
    }
    clear_queue(&vdev_ctrlq);
    for (uint32_t i = 0; i < npairs; i++) {
        if (setup_queue(&vdev_rxqs[i], (uint16_t)(2 * i), 2 * i, &vdev_stats.rx_kicks,
                        &vdev_stats.rx_kicks_suppressed, &vdev_stats.rx_irqs, ev, packed, NULL) ||
            setup_queue(&vdev_txqs[i], (uint16_t)(2 * i + 1), 2 * i + 1, &vdev_stats.tx_kicks,
                        &vdev_stats.tx_kicks_suppressed, &vdev_stats.tx_irqs, ev, packed,
                        ind ? ind_tables[i] : NULL)) {
            vt_set_status(VIRTIO_STATUS_FAILED);
            return -5;
        }
    }
    static uint64_t ctrl_kicks, ctrl_kicks_suppressed, ctrl_irqs;
    if (npairs > 1 && setup_queue(&vdev_ctrlq, (uint16_t)(2 * maxp), CTRL_SLOT, &ctrl_kicks,
                                  &ctrl_kicks_suppressed, &ctrl_irqs, ev, packed, NULL)) {
        vt_set_status(VIRTIO_STATUS_FAILED);
        return -5;
    }
    if (npairs > 1)
        vdev_vqs[CTRL_SLOT].flags |= VDEV_VQF_CTRL;
    vdev_info.rx_qsize = vdev_rxq.size;
    vdev_info.tx_qsize = vdev_txq.size;
    vdev_info.rx_desc = vdev_vqs[0].desc;
    vdev_info.rx_avail = vdev_vqs[0].driver;
    vdev_info.rx_used = vdev_vqs[0].device;
    vdev_info.tx_desc = vdev_vqs[1].desc;
    vdev_info.tx_avail = vdev_vqs[1].driver;
    vdev_info.tx_used = vdev_vqs[1].device;
    /* Channel rings as deep as the virtqueues: a full TX ring is exactly one
     * full virtqueue (num_slots - 1 usable slots on each side). */
    pool_init(vdev_txq.size, vdev_rxq.size);
    /* The rebuild reclaims every packet: none may still be in use. */
    BUG_ON(pool_md_in_use() != 0, "pool leak after reset: packets still in use", pool_md_in_use(),
           0);

    uint8_t st = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_DRIVER_OK;
    if (vt_is_modern())
        st |= VIRTIO_STATUS_FEATURES_OK;
    /* Buffers may be made available before DRIVER_OK (3.1.1 step 7). */
    for (uint32_t i = 0; i < npairs; i++)
        refill_rx(&vdev_rxqs[i]);
    vt_set_status(st);
    if (drv & (1ULL << VIRTIO_NET_F_MAC)) {
        for (uint32_t i = 0; i < 6; i++)
            vdev_info.mac[i] = vt_cfg8(i);
    } else {
        static const uint8_t def[6] = {0x52, 0x54, 0x00, 0x12, 0x34, 0x56};
        memcpy(vdev_info.mac, def, 6);
    }
    last_status = link_status();
    vdev_stats.link_up = (last_status & VIRTIO_NET_S_LINK_UP) != 0;
    up = 1;
    for (uint32_t i = 0; i < npairs; i++)
        vq_publish(&vdev_rxqs[i]);
    /* 5.1.6.5.5 Automatic receive steering in multiqueue mode: after
     * DRIVER_OK, tell the device how many pairs to use (QEMU then enables
     * those rings in the vhost-user backend with SET_VRING_ENABLE). */
    if (npairs > 1 && ctrl_cmd(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                               (uint16_t)npairs)) {
        kprintf("! ctrl: VQ_PAIRS_SET %u refused\n", npairs);
        npairs = 1;
        vdev_info.pairs = 1;
    }
    return 0;
}

int net_init(void)
{
    probed = 0;
    return bringup();
}

/* Reset the device and rebuild queues, pool and rings from scratch.  Every
 * packet the driver or device held is reclaimed by re-initialising the pool,
 * so nothing a misbehaving device wrote is ever followed. */
int net_restart(int violation)
{
    if (in_restart)
        return -1;
    in_restart = 1;
    vdev_stats.resets++;
    if (violation) {
        vdev_stats.recoveries++;
        kprintf("! recovering: device reset\n");
    }
#ifdef PLANT_RESET_LEAK
    {
        extern uint32_t pool_leak_hint;
        uint32_t held = 0;
        for (uint32_t i = 0; i < npairs; i++)
            held += vdev_txqs[i].in_flight;
        pool_leak_hint = held;
    }
#endif
    if (!probed && vt_probe(net_opts.force) == 0)
        probed = 1;
    int r = probed ? bringup() : -1;
    in_restart = 0;
    return r;
}

static int check_device(void)
{
    /* 2.1.1: a modern device may set NEEDS_RESET; treat it like a violation.
     * Read rarely: a status read is a device access on every transport. */
    if ((++sync_count & 255) == 0 && vt_is_modern() &&
        (vt_get_status() & VIRTIO_STATUS_NEEDS_RESET)) {
        net_violation(&vdev_stats.viol_device_needs_reset, "viol_device_needs_reset", 0, 0);
        return -1;
    }
    return 0;
}

static int recover(void)
{
    net_restart(1);
    return -1;
}

/* Completed TX chains give their packets back to the pool. */
static void tx_reap(struct vq *q)
{
    for (;;) {
        int n = vq_used_pending(q);
        if (n <= 0)
            return;
        uint32_t tok, len;
        if (vq_peek_used(q, 0, &tok, &len))
            return;
        vq_consume(q, 1);
        pool_packet_free(tok);
        vdev_stats.tx_completions++;
    }
}

/* One's-complement sum over a packet's segments from byte `start` on. */
static uint32_t csum_segs(const struct vq_seg *segs, int n, uint32_t start)
{
    uint32_t sum = 0, pos = 0, odd = 0;
    for (int i = 0; i < n; i++) {
        const uint8_t *p = (const uint8_t *)(uintptr_t)segs[i].addr;
        for (uint32_t k = 0; k < segs[i].len; k++, pos++) {
            if (pos < start)
                continue;
            sum += odd ? p[k] : (uint32_t)p[k] << 8;
            odd ^= 1;
        }
    }
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return sum;
}

static uint8_t *seg_byte(const struct vq_seg *segs, int n, uint32_t off)
{
    for (int i = 0; i < n; i++) {
        if (off < segs[i].len)
            return (uint8_t *)(uintptr_t)segs[i].addr + off;
        off -= segs[i].len;
    }
    return NULL;
}

/* 5.1.6.2 "Packet Transmission": without VIRTIO_NET_F_CSUM the driver must
 * send a complete checksum, so finish the partial one here (the field holds
 * the pseudo-header sum; add everything from csum_start on). */
static int sw_checksum(const struct vq_seg *segs, int n, uint16_t start, uint16_t off)
{
    uint8_t *hi = seg_byte(segs, n, (uint32_t)start + off), *lo = seg_byte(segs, n, (uint32_t)start + off + 1);
    if (!hi || !lo)
        return -1;
    uint16_t c = (uint16_t)~csum_segs(segs, n, start);
    if (c == 0 && off == 6)
        c = 0xffff;                      /* UDP: 0 means "no checksum" (RFC 768) */
    *hi = (uint8_t)(c >> 8);
    *lo = (uint8_t)c;
    return 0;
}

/* Internalize one TX packet (never trust the user's metadata) and turn its
 * buflets into a descriptor chain.  Returns 1 posted, 0 no room, -1 bad. */
static int tx_post(uint32_t p, struct vq **qp)
{
    /* Only a packet the user holds may be sent (Skywalk: UNALLOCATED_PKT). */
    if (!pool_md_valid(p) || pool_md_owner(p) != OWN_USER)
        return -1;
    struct sk_packet *pk = pkt_md(p);
    struct vq_seg segs[POOL_MAX_FRAGS];
    if (pk->bufs_cnt < 1 || pk->bufs_cnt > POOL_MAX_FRAGS || !(pk->qflags & SK_QUM_FINALIZED))
        return -1;
    struct sk_buflet *bl = &pk->buf0;
    uint32_t total = 0;
    for (int i = 0; i < pk->bufs_cnt; i++) {
        if (!bl || bl->buf_idx >= POOL_BUFS || bl->dlim > POOL_BUF_SIZE ||
            bl->doff > bl->dlim || bl->dlen > bl->dlim - bl->doff)
            return -1;
        uint32_t a = (uint32_t)(uintptr_t)buf_addr(bl->buf_idx) + bl->doff;
        segs[i].addr = a;
        segs[i].len = bl->dlen;
        segs[i].write = 0;
        total += bl->dlen;
        bl = (i + 1 < pk->bufs_cnt) ? (bl->next_idx < POOL_BUFLETS ? buflet_at(bl->next_idx) : NULL) : NULL;
    }
    /* The vnet header goes in the headroom in front of buf0's data. */
    if (total != pk->len || total < 14 || pk->buf0.doff < hdr_len || segs[0].len < 14)
        return -1;
    struct vq *q = &vdev_txqs[npairs > 1 ? flow_hash((const uint8_t *)(uintptr_t)segs[0].addr,
                                                      segs[0].len) % npairs
                                         : 0];
    *qp = q;
    int slots = q->ind ? 1 : pk->bufs_cnt;
    if (q->num_free < slots)
        return 0;
    struct virtio_net_hdr_mrg h;
    memset(&h, 0, sizeof(h));
    if (pk->pflags & SK_PKT_VNET_HDR)
        memcpy(&h, &pk->vnet, 10);
    if (h.gso_type != VIRTIO_NET_HDR_GSO_NONE) {
        /* 5.1.6.2: a GSO type needs the matching HOST_TSO feature (and
         * NEEDS_CSUM); this driver does not segment in software. */
        uint8_t kind = h.gso_type & (uint8_t)~VIRTIO_NET_HDR_GSO_ECN;
        int ok = (kind == VIRTIO_NET_HDR_GSO_TCPV4 && net_has(VIRTIO_NET_F_HOST_TSO4)) ||
                 (kind == VIRTIO_NET_HDR_GSO_TCPV6 && net_has(VIRTIO_NET_F_HOST_TSO6));
        if (!ok || !(h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)) {
            vdev_stats.tx_gso_refused++;
            return -1;
        }
        vdev_stats.tx_gso++;
    }
    if (h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
        if (net_has(VIRTIO_NET_F_CSUM)) {
            vdev_stats.tx_csum_offload++;
        } else {
            if (sw_checksum(segs, pk->bufs_cnt, h.csum_start, h.csum_offset))
                return -1;
            h.flags = 0;
            h.csum_start = h.csum_offset = 0;
            vdev_stats.tx_csum_sw++;
        }
    }
    h.flags &= VIRTIO_NET_HDR_F_NEEDS_CSUM; /* DATA_VALID is for RX only */
    segs[0].addr -= hdr_len;
    segs[0].len += hdr_len;
    uint8_t *hdr = (uint8_t *)(uintptr_t)segs[0].addr;
    memset(hdr, 0, hdr_len);
    memcpy(hdr, &h, 10);
    if (vq_add(q, segs, pk->bufs_cnt, p) < 0)
        return 0;
    pool_md_set_owner(p, OWN_KERNEL);    /* the device has it until used */
    vdev_stats.tx_packets++;
    vdev_stats.tx_bytes += total;
    q->info->packets++;
    q->info->bytes += total;
    return 1;
}

static int any_broken(void)
{
    for (uint32_t i = 0; i < npairs; i++)
        if (vdev_txqs[i].broken || vdev_rxqs[i].broken)
            return 1;
    return 0;
}

int ksync_tx(struct sk_ring *r)
{
    if (!up)
        return -1;
    for (uint32_t i = 0; i < npairs; i++)
        tx_reap(&vdev_txqs[i]);
    if (any_broken() || check_device())
        return recover();
    uint32_t n = r->ring_num_slots, k = r->ring_khead, h = r->ring_head;
    if (h >= n)
        return -2;                       /* BASIC_SANITY: head out of range */
    while (k != h) {
        struct sk_slot *s = sk_slot_at(r, k);
        struct vq *q = NULL;
        int res = (s->sd_flags & SK_SD_VALID) ? tx_post(s->sd_md_idx, &q) : -1;
        if (res == 0) {
            vdev_stats.tx_ring_full++;
            break;
        }
        if (res < 0) {
            /* Dropped, as the kernel drops a packet that fails internalize;
             * freed only if it really was the user's. */
            vdev_stats.tx_bad_packets++;
            if ((s->sd_flags & SK_SD_VALID) && pool_md_owner(s->sd_md_idx) == OWN_USER)
                pool_packet_free(s->sd_md_idx);
        }
        s->sd_flags = 0;                 /* ownership moved to the device */
        s->sd_md_idx = SK_NO_INDEX;
        k = ring_next(r, k);
    }
    r->ring_khead = k;
    r->ring_tail = k == 0 ? n - 1 : k - 1;
    r->ready_slots = sk_available_slot_count(r);
    for (uint32_t i = 0; i < npairs; i++)
        vq_publish(&vdev_txqs[i]);
    pool_update_gauges();
    return any_broken() ? recover() : 0;
}

/* Build one RX packet from `nb` validated used entries starting at 0. */
static void rx_build(struct sk_ring *r, struct vq *q, uint32_t nb, const uint32_t *bufs,
                     const uint32_t *lens)
{
    uint32_t p;
    if (pool_md_alloc(&p)) {
        for (uint32_t i = 0; i < nb; i++)
            pool_buf_free(bufs[i]);
        vdev_stats.rx_dropped++;
        return;
    }
    /* Each buffer is POOL_BUF_SIZE bytes: a length past it would make the
     * packet's data window run into the next buffer. */
    for (uint32_t i = 0; i < nb; i++) {
        if (BUG_ON(lens[i] > POOL_BUF_SIZE, "rx used len overruns its buffer", lens[i],
                   POOL_BUF_SIZE)) {
            for (uint32_t j = 0; j < nb; j++)
                pool_buf_free(bufs[j]);
            pool_packet_free(p);
            q->broken = 1;
            return;
        }
    }
    struct sk_packet *pk = pkt_md(p);
    pk->buf0.buf_idx = bufs[0];
    pk->buf0.doff = hdr_len;
    pk->buf0.dlen = lens[0] - hdr_len;
    pk->buf0.dlim = POOL_BUF_SIZE;
    pk->bufs_cnt = 1;
    struct sk_buflet *last = &pk->buf0;
    for (uint32_t i = 1; i < nb; i++) {
        uint32_t bi;
        if (pool_buflet_alloc(&bi)) {
            for (uint32_t j = i; j < nb; j++)
                pool_buf_free(bufs[j]);
            pool_packet_free(p);
            vdev_stats.rx_dropped++;
            return;
        }
        struct sk_buflet *bl = buflet_at(bi);
        bl->buf_idx = bufs[i];
        bl->doff = 0;
        bl->dlen = lens[i];
        bl->dlim = POOL_BUF_SIZE;
        last->next_idx = bi;
        last = bl;
        pk->bufs_cnt++;
    }
    /* The packet is loaned to the user through the RX slot: it may detach it
     * (and e.g. send it); whatever is still attached at release is freed. */
    pool_md_set_owner(p, OWN_USER);
    memcpy(&pk->vnet, buf_addr(bufs[0]), hdr_len > 12 ? 12 : hdr_len);
    pk->pflags |= SK_PKT_VNET_HDR;
    /* 5.1.6.4.1: NEEDS_CSUM (GUEST_CSUM negotiated) means the checksum is
     * partial, DATA_VALID that the device checked it. */
    if (pk->vnet.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)
        vdev_stats.rx_csum_partial++;
    if (pk->vnet.flags & VIRTIO_NET_HDR_F_DATA_VALID)
        vdev_stats.rx_csum_valid++;
    if (pk->vnet.gso_type != VIRTIO_NET_HDR_GSO_NONE)
        vdev_stats.rx_gso++;
    sk_packet_finalize(p);
    pk->l2_len = 14;
    uint32_t t = r->ring_tail;
    struct sk_slot *s = sk_slot_at(r, t);
    s->sd_md_idx = p;
    s->sd_len = (uint16_t)(pk->len > 0xffff ? 0xffff : pk->len);
    s->sd_flags = SK_SD_VALID;
    r->ring_tail = ring_next(r, t);
    vdev_stats.rx_packets++;
    vdev_stats.rx_bytes += pk->len;
    q->info->packets++;
    q->info->bytes += pk->len;
    r->ready_bytes += pk->len;
}

/* Harvest one RX queue into the ring while it has room (one slot stays empty). */
static void rx_harvest(struct sk_ring *r, struct vq *q)
{
    while (ring_next(r, r->ring_tail) != r->ring_khead) {
        int avail = vq_used_pending(q);
        if (avail <= 0)
            break;
        uint32_t bufs[POOL_MAX_FRAGS], lens[POOL_MAX_FRAGS];
        if (vq_peek_used(q, 0, &bufs[0], &lens[0]))
            break;
        if (lens[0] < hdr_len) {
            net_violation(&vdev_stats.viol_used_len, "viol_used_len", lens[0], hdr_len);
            q->broken = 1;
            break;
        }
        uint32_t nb = 1;
        if (mrg) {
            /* 5.1.6.4 "Processing of Incoming Packets": num_buffers says how
             * many used entries this frame spans; it must be possible. */
            nb = ((struct virtio_net_hdr_mrg *)buf_addr(bufs[0]))->num_buffers;
            if (nb == 0 || nb > POOL_MAX_FRAGS || nb > q->in_flight) {
                net_violation(&vdev_stats.viol_num_buffers, "viol_num_buffers", nb, q->in_flight);
                q->broken = 1;
                break;
            }
            if (nb > (uint32_t)avail)
                break;                   /* rest not published yet */
        }
        int bad = 0;
        for (uint32_t i = 1; i < nb && !bad; i++)
            bad = vq_peek_used(q, i, &bufs[i], &lens[i]);
        if (bad)
            break;
        vq_consume(q, nb);
        vdev_stats.rx_buffers += nb;
        rx_build(r, q, nb, bufs, lens);
    }
}

int ksync_rx(struct sk_ring *r)
{
    if (!up)
        return -1;
    uint32_t n = r->ring_num_slots, h = r->ring_head;
    if (h >= n)
        return -2;
    /* Slots the user released: [khead, head).  Detached slots are skipped. */
    for (uint32_t k = r->ring_khead; k != h; k = ring_next(r, k)) {
        struct sk_slot *s = sk_slot_at(r, k);
        uint32_t p = s->sd_md_idx;
        if ((s->sd_flags & SK_SD_VALID) && pool_md_valid(p) && pool_md_owner(p) == OWN_USER) {
            uint32_t len = pkt_md(p)->len;
            r->ready_bytes -= len <= r->ready_bytes ? len : r->ready_bytes;
            pool_packet_free(p);
        }
        s->sd_flags = 0;
        s->sd_md_idx = SK_NO_INDEX;
    }
    r->ring_khead = h;
    if (h == r->ring_tail)
        r->ready_bytes = 0;
    if (check_device())
        return recover();
    for (uint32_t i = 0; i < npairs; i++)
        rx_harvest(r, &vdev_rxqs[i]);
    r->ready_slots = sk_available_slot_count(r);
    if (any_broken())
        return recover();
    for (uint32_t i = 0; i < npairs; i++) {
        refill_rx(&vdev_rxqs[i]);
        vq_publish(&vdev_rxqs[i]);
    }
    pool_update_gauges();
    return any_broken() ? recover() : 0;
}

/* ---- interrupts (called by irq.c with interrupts off) ---- */

static void config_changed(void)
{
    vdev_stats.irq_config++;
    if (!up)
        return;
    /* 5.1.4.2: the status field is read on a configuration change. */
    uint16_t st = link_status();
    if ((st ^ last_status) & VIRTIO_NET_S_LINK_UP) {
        vdev_stats.link_changes++;
        link_reports++;
    }
    last_status = st;
    vdev_stats.link_up = (st & VIRTIO_NET_S_LINK_UP) != 0;
    cfg_pending = 1;
}

static void queue_note(struct vq *q, int *hit, int *unarmed)
{
    if (!vq_irq_progress(q))
        return;
    if (q->armed) {
        *hit = 1;
        q->irq_pending = 1;
        q->wd_since = 0;
        (*q->irqs)++;
        q->info->irqs++;
    } else {
        *unarmed = 1;
    }
}

/* A used-buffer notification for the queues on MSI-X entry `entry` (0: all,
 * for INTx).  Which queue it was for is not in the interrupt: a queue whose
 * notifications are on and whose device progress moved gets it. */
static void queues_notified(uint32_t entry)
{
    int hit = 0, unarmed = 0;
    vdev_stats.irq_queue++;
    if (!up)
        return;
    for (uint32_t i = 0; i < npairs; i++) {
        struct vq *qs[2] = {&vdev_rxqs[i], &vdev_txqs[i]};
        for (int k = 0; k < 2; k++)
            if (!entry || qs[k]->info->msix_vector == entry)
                queue_note(qs[k], &hit, &unarmed);
    }
    if (!hit) {
        if (unarmed)
            vdev_stats.irq_unarmed++;
        else
            vdev_stats.irq_spurious++;
    }
}

void net_irq_intx(void)
{
    vdev_stats.irq_total++;
    uint8_t isr = vt_read_isr();         /* read-to-ack: drops the line */
    if (!isr) {
        vdev_stats.irq_isr_zero++;
        return;
    }
    if (isr & VIRTIO_PCI_ISR_CONFIG)
        config_changed();
    if (isr & VIRTIO_PCI_ISR_QUEUE)
        queues_notified(0);
}

void net_irq_vector(uint32_t entry)
{
    vdev_stats.irq_total++;
    if (entry == 0)
        config_changed();
    else
        queues_notified(entry);
}

/* ---- waiting ---- */

void net_poll_events(void)
{
    if (!cfg_pending && !link_reports)
        return;
    uint32_t fl = irq_save();
    uint32_t changes = link_reports;
    link_reports = 0;
    cfg_pending = 0;
    irq_restore(fl);
    if (changes)
        kprintf("! link %s changes=%llu\n", vdev_stats.link_up ? "up" : "down",
                vdev_stats.link_changes);
}

#define FOR_WAITED(what, q, body)                                                    \
    for (uint32_t _i = 0; _i < npairs; _i++) {                                       \
        struct vq *_qs[2] = {(what) & WAIT_RX ? &vdev_rxqs[_i] : NULL,              \
                             (what) & WAIT_TX ? &vdev_txqs[_i] : NULL};             \
        for (int _k = 0; _k < 2; _k++) {                                             \
            struct vq *q = _qs[_k];                                                  \
            if (!q)                                                                  \
                continue;                                                            \
            body                                                                     \
        }                                                                            \
    }

/* The lost-interrupt watchdog: work visible on a queue that asked to be told,
 * with no interrupt for it for irq_wd ms.  Named, counted and processed. */
NO_COV static int watchdog(uint32_t what)
{
    uint64_t now = rdtsc(), bound = (uint64_t)irq_opts.wd_ms * tsc_per_ms;
    int fired = 0;
    FOR_WAITED(what, q, {
        if (fired)
            break;
        if (q->armed && !q->irq_pending && vq_has_used(q)) {
            if (!q->wd_since) {
                q->wd_since = now;
            } else if (now - q->wd_since >= bound) {
                uint32_t waited = (uint32_t)udiv64(now - q->wd_since, tsc_per_ms, NULL);
                q->wd_since = 0;
                vdev_stats.irq_lost++;
                q->info->irq_lost++;
                vq_mark_seen(q);         /* this work is accounted for now */
                kprintf("! lost interrupt %sq%u vq=%u waited_ms=%u\n", q->index & 1 ? "tx" : "rx",
                        (uint32_t)q->index / 2, q->index, waited);
                fired = 1;
            }
        } else {
            q->wd_since = 0;
        }
    })
    return fired;
}

NO_COV int net_wait(uint32_t what, uint64_t deadline)
{
    if (!irq_enabled() || !up) {
        /* Polling.  Under TCG a vCPU spinning on RAM alone can keep QEMU's I/O
         * thread from delivering packets (seen on microvm); one device
         * register access per round lets it run. */
        int key = (what & WAIT_KEY) && (inb(0x3f8 + 5) & 1);
        if (!key)
            (void)inb(0x3f8 + 5);
        return key ? 2 : 1;
    }
    int work = 0;
    FOR_WAITED(what, q, {
        if (q->irq_pending) {
            q->irq_pending = 0;
            work = 1;
        }
        work |= vq_arm(q);
    })
    if (work)
        return 1;
    for (;;) {
        cli();
        FOR_WAITED(what, q, {
            if (q->irq_pending) {
                q->irq_pending = 0;
                work = 1;
            }
        })
        if (work) {
            sti();
            return 1;
        }
        if ((what & WAIT_KEY) && (inb(0x3f8 + 5) & 1)) {
            sti();
            return 2;
        }
        if (deadline && time_expired(deadline)) {
            sti();
            return 0;
        }
        if (watchdog(what)) {
            sti();
            return 1;
        }
        vdev_halts++;
        sti_hlt();
        if (cfg_pending)
            net_poll_events();
    }
}

void net_wait_done(void)
{
    for (uint32_t i = 0; i < npairs; i++) {
        vdev_rxqs[i].irq_pending = vdev_txqs[i].irq_pending = 0;
        vdev_rxqs[i].wd_since = vdev_txqs[i].wd_since = 0;
        if (vdev_rxqs[i].armed)
            vq_disarm(&vdev_rxqs[i]);
        if (vdev_txqs[i].armed)
            vq_disarm(&vdev_txqs[i]);
    }
}
