/*
 * The kernel half of the channel: moves packets between the Skywalk rings
 * (channel.c) and the device's split virtqueues (virtq.c), and owns device
 * bring-up, reset and recovery.  Queue 0 is receiveq1, queue 1 transmitq1
 * (5.1.2 "Virtqueues").
 */
#include "driver.h"

struct vdev_stats vdev_stats = {.magic = VDEV_STATS_MAGIC, .version = VDEV_STATS_VERSION};
struct vdev_info vdev_info = {.magic = VDEV_STATS_MAGIC};
struct net_opts net_opts = {.event_idx = 1, .mrg_rxbuf = 1, .force = FORCE_AUTO, .qsize = 256};

/* Exported so the host can find the virtqueues' private state too. */
struct vq vdev_rxq, vdev_txq;
static uint8_t rx_mem[16 * VQ_MAX + 8192 + 8 * VQ_MAX + 4096] __attribute__((aligned(4096)));
static uint8_t tx_mem[16 * VQ_MAX + 8192 + 8 * VQ_MAX + 4096] __attribute__((aligned(4096)));

static int up, probed, in_restart;
static uint32_t hdr_len;
static int mrg;
static uint32_t sync_count;

int net_ready(void) { return up; }
uint32_t net_tx_in_flight(void) { return up ? vdev_txq.in_flight : 0; }

void net_violation(uint64_t *counter, const char *name, uint32_t a, uint32_t b)
{
    (*counter)++;
    vdev_stats.violations++;
    kprintf("! violation %s a=%u b=%u\n", name, a, b);
}

static void refill_rx(void)
{
    struct vq *q = &vdev_rxq;
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
    uint64_t want = 1ULL << VIRTIO_NET_F_MAC;
    if (vt_is_modern())
        want |= 1ULL << VIRTIO_F_VERSION_1;
    else
        want |= 1ULL << VIRTIO_F_ANY_LAYOUT;
    if (net_opts.mrg_rxbuf)
        want |= 1ULL << VIRTIO_NET_F_MRG_RXBUF;
    if (net_opts.event_idx)
        want |= 1ULL << VIRTIO_RING_F_EVENT_IDX;
    uint64_t drv = devf & want;
    vdev_info.device_features = devf;
    vdev_info.driver_features = drv;
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
    mrg = (drv >> VIRTIO_NET_F_MRG_RXBUF) & 1;
    int ev = (int)((drv >> VIRTIO_RING_F_EVENT_IDX) & 1);
    /* 5.1.6 "Device Operation": the header is 12 bytes with MRG_RXBUF or
     * VERSION_1, else the 10-byte legacy struct virtio_net_hdr. */
    hdr_len = (mrg || (drv >> VIRTIO_F_VERSION_1) & 1) ? 12 : 10;
    vdev_info.hdr_len = (uint16_t)hdr_len;

    uint16_t qs[2];
    for (uint16_t qi = 0; qi < 2; qi++) {
        uint16_t max = vt_queue_max(qi);
        uint16_t size = max;
        if (vdev_info.transport != VDEV_TRANSPORT_PCI_LEGACY && net_opts.qsize && net_opts.qsize < max)
            size = (uint16_t)net_opts.qsize;
        if (size == 0 || size > VQ_MAX) {
            vt_set_status(VIRTIO_STATUS_FAILED);
            return -4;
        }
        qs[qi] = size;
    }
    vdev_rxq.kicks = &vdev_stats.rx_kicks;
    vdev_rxq.kicks_suppressed = &vdev_stats.rx_kicks_suppressed;
    vdev_txq.kicks = &vdev_stats.tx_kicks;
    vdev_txq.kicks_suppressed = &vdev_stats.tx_kicks_suppressed;
    vq_init(&vdev_rxq, 0, qs[0], rx_mem, ev);
    vq_init(&vdev_txq, 1, qs[1], tx_mem, ev);
    struct vq *qv[2] = {&vdev_rxq, &vdev_txq};
    for (uint16_t qi = 0; qi < 2; qi++) {
        struct vq *q = qv[qi];
        if (vt_queue_setup(qi, q->size, (uintptr_t)q->desc, (uintptr_t)q->avail, (uintptr_t)q->used)) {
            vt_set_status(VIRTIO_STATUS_FAILED);
            return -5;
        }
    }
    vdev_info.rx_qsize = vdev_rxq.size;
    vdev_info.tx_qsize = vdev_txq.size;
    vdev_info.rx_desc = (uint32_t)(uintptr_t)vdev_rxq.desc;
    vdev_info.rx_avail = (uint32_t)(uintptr_t)vdev_rxq.avail;
    vdev_info.rx_used = (uint32_t)(uintptr_t)vdev_rxq.used;
    vdev_info.tx_desc = (uint32_t)(uintptr_t)vdev_txq.desc;
    vdev_info.tx_avail = (uint32_t)(uintptr_t)vdev_txq.avail;
    vdev_info.tx_used = (uint32_t)(uintptr_t)vdev_txq.used;
    /* Channel rings as deep as the virtqueues: a full TX ring is exactly one
     * full virtqueue (num_slots - 1 usable slots on each side). */
    pool_init(vdev_txq.size, vdev_rxq.size);

    uint8_t st = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_DRIVER_OK;
    if (vt_is_modern())
        st |= VIRTIO_STATUS_FEATURES_OK;
    /* Buffers may be made available before DRIVER_OK (3.1.1 step 7). */
    refill_rx();
    vt_set_status(st);
    if (drv & (1ULL << VIRTIO_NET_F_MAC)) {
        for (uint32_t i = 0; i < 6; i++)
            vdev_info.mac[i] = vt_cfg8(i);
    } else {
        static const uint8_t def[6] = {0x52, 0x54, 0x00, 0x12, 0x34, 0x56};
        memcpy(vdev_info.mac, def, 6);
    }
    up = 1;
    vq_publish(&vdev_rxq);
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
static void tx_reap(void)
{
    struct vq *q = &vdev_txq;
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

/* Internalize one TX packet (never trust the user's metadata) and turn its
 * buflets into a descriptor chain.  Returns 1 posted, 0 no room, -1 bad. */
static int tx_post(uint32_t p)
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
    if (total != pk->len || total < 14 || pk->buf0.doff < hdr_len)
        return -1;
    segs[0].addr -= hdr_len;
    segs[0].len += hdr_len;
    if (vdev_txq.num_free < pk->bufs_cnt)
        return 0;
    uint8_t *hdr = (uint8_t *)(uintptr_t)segs[0].addr;
    memset(hdr, 0, hdr_len);
    if (pk->pflags & SK_PKT_VNET_HDR)
        memcpy(hdr, &pk->vnet, hdr_len > 10 ? 10 : hdr_len);
    if (vq_add(&vdev_txq, segs, pk->bufs_cnt, p) < 0)
        return 0;
    pool_md_set_owner(p, OWN_KERNEL);    /* the device has it until used */
    vdev_stats.tx_packets++;
    vdev_stats.tx_bytes += total;
    return 1;
}

int ksync_tx(struct sk_ring *r)
{
    if (!up)
        return -1;
    tx_reap();
    if (vdev_txq.broken || check_device())
        return recover();
    uint32_t n = r->ring_num_slots, k = r->ring_khead, h = r->ring_head;
    if (h >= n)
        return -2;                       /* BASIC_SANITY: head out of range */
    while (k != h) {
        struct sk_slot *s = sk_slot_at(r, k);
        int res = (s->sd_flags & SK_SD_VALID) ? tx_post(s->sd_md_idx) : -1;
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
    vq_publish(&vdev_txq);
    pool_update_gauges();
    return vdev_txq.broken ? recover() : 0;
}

/* Build one RX packet from `nb` validated used entries starting at 0. */
static void rx_build(struct sk_ring *r, uint32_t nb, const uint32_t *bufs, const uint32_t *lens)
{
    uint32_t p;
    if (pool_md_alloc(&p)) {
        for (uint32_t i = 0; i < nb; i++)
            pool_buf_free(bufs[i]);
        vdev_stats.rx_dropped++;
        return;
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
    r->ready_bytes += pk->len;
}

int ksync_rx(struct sk_ring *r)
{
    if (!up)
        return -1;
    struct vq *q = &vdev_rxq;
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
    /* Harvest while the ring has room (one slot always stays empty). */
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
        rx_build(r, nb, bufs, lens);
    }
    r->ready_slots = sk_available_slot_count(r);
    if (q->broken)
        return recover();
    refill_rx();
    vq_publish(q);
    pool_update_gauges();
    return q->broken ? recover() : 0;
}
