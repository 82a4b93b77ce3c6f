/*
 * Compiled virtqueue bursts for split rings (virtio 1.x 2.7 "Split Virtqueues"): the TX
 * chain walk into pool packets and the RX write of pool packets into guest buffers, each
 * one call per burst (cffi releases the GIL around it).
 *
 * The Python code is the reference: vdev/virtio/split.py (pop/push/flush/notify),
 * vdev/virtio/chain.py (walk_chain, Segments, indirect_table), vdev/skywalk/pool.py
 * (packet_from_bytes) and vdev/net/nic.py (the TX loop, _internalize_tx, drain_rx,
 * _write_rx).  This file runs the same checks in the same order on the same fields, with
 * one rule that keeps the two exact: a burst only ever completes items the reference
 * would complete without a drop, a kill or a pool shortage.  On anything else it stops
 * *before* the item with the queue exactly as the reference would have left it after the
 * previous one, and says why (VQ_STOP_SLOW / VQ_STOP_VIOLATION with a code); the Python
 * reference then handles that one item, so kill reasons, details, drop counters and pool
 * failure counts are produced in one place only.
 *
 * Guest memory: every access goes through the g_* helpers below and happens inside the
 * burst function's dynamic extent, so a guard (sigsetjmp around the burst, a SIGBUS
 * handler) can wrap them; state a guard must leave defined is committed item by item into
 * struct vq_split (an item is either fully accounted there or not at all, apart from the
 * used element a TX chain writes before its copy, which is unpublished until the flush).
 *
 * Memory ordering (2.7.13 / 2.7.8): on x86-64 (TSO) program order is enough for the ring
 * reads and the used-element-before-idx store; the compiler barrier below keeps the
 * compiler from reordering them.
 */
#include <string.h>

#include "virtio.h"
#include "skywalk.h"
#include "virtq.h"

#define BARRIER() __asm__ __volatile__("" ::: "memory")
#define U32_MAX 0xFFFFFFFFull
#define MAX_INDIRECT 65536u
#define MAX_FRAME 65550u
#define NET_HDR_LEN 12u
#define KERNEL_OWNER (-1)
#define PKT_ALLOCATED 1

/* ---------------------------------------------------------------- guest memory access */
static inline uint16_t g_rd16(const uint16_t *p) { return *(const volatile uint16_t *)p; }
static inline uint32_t g_rd32(const uint32_t *p) { return *(const volatile uint32_t *)p; }
static inline uint64_t g_rd64(const uint64_t *p) { return *(const volatile uint64_t *)p; }
static inline void g_wr16(uint16_t *p, uint16_t v) { *(volatile uint16_t *)p = v; }
static inline void g_wr32(uint32_t *p, uint32_t v) { *(volatile uint32_t *)p = v; }
static inline void g_copy_from(void *dst, const uint8_t *src, size_t n) { memcpy(dst, src, n); }
static inline void g_copy_to(uint8_t *dst, const void *src, size_t n) { memcpy(dst, src, n); }

/* One descriptor, each field read exactly once (the driver may rewrite it under us). */
struct desc_rd {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

static inline void g_rd_desc(const uint8_t *table, uint32_t i, struct desc_rd *d)
{
    const struct vring_desc *v = (const struct vring_desc *)table + i;
    d->addr = g_rd64(&v->addr);
    d->len = g_rd32(&v->len);
    d->flags = g_rd16(&v->flags);
    d->next = g_rd16(&v->next);
}

/* GuestMemory.gpa_view for length > 0: inside exactly one region, else NULL. */
static uint8_t *gpa_ptr(const struct vq_split *q, uint64_t addr, uint64_t len)
{
    uint32_t i;
    for (i = 0; i < q->nregions; i++) {
        const struct vq_region *r = &q->regions[i];
        if (addr >= r->gpa && addr - r->gpa < r->size) {
            if (len > r->size - (addr - r->gpa))
                return NULL;
            return r->host + (addr - r->gpa);
        }
    }
    return NULL;
}

/* ---------------------------------------------------------------- chain walk */
struct chain {
    uint32_t head;
    uint32_t nseg;                /* segments in q->segs from seg0 */
    uint32_t seg0;
    uint32_t nread;               /* how many of them are device-readable (they come first) */
    uint64_t read_len, write_len;
    uint32_t desc_count;
};

/* chain.walk_chain + Segments.add/finish + indirect_table: 0 or a VQV_* code. */
static uint32_t walk_chain(struct vq_split *q, uint32_t head, uint32_t seg0, struct chain *c,
                           uint32_t *segs_full)
{
    const uint8_t *table = q->desc;
    uint32_t limit = q->size, idx = head, count = 0, total = 0, in_indirect = 0;
    uint32_t nseg = 0, seen_writable = 0;
    uint64_t read_len = 0, write_len = 0;
    struct desc_rd d;

    *segs_full = 0;
    for (;;) {
        g_rd_desc(table, idx, &d);
        count++;
        total++;
        if (count > limit)
            return VQV_LOOP;
        if (total - in_indirect > q->size)
            return VQV_TOO_LONG;
        if (d.flags & VRING_DESC_F_INDIRECT) {
            uint8_t *t;
            if (in_indirect)
                return VQV_NESTED;
            if (!q->indirect_ok)
                return VQV_INDIRECT_FEATURE;
            if (d.flags & VRING_DESC_F_NEXT)
                return VQV_INDIRECT_NEXT;
            if (d.len == 0 || d.len % sizeof(struct vring_desc))
                return VQV_INDIRECT_LEN;
            if (d.len / sizeof(struct vring_desc) > MAX_INDIRECT)
                return VQV_INDIRECT_MAX;
            t = gpa_ptr(q, d.addr, d.len);
            if (t == NULL)
                return VQV_INDIRECT_MEM;
            /* 2.7.5.3.2: WRITE on the table's descriptor is ignored; go to entry 0. */
            table = t;
            limit = d.len / sizeof(struct vring_desc);
            in_indirect = 1;
            idx = 0;
            count = 0;
            continue;
        }
        if (d.flags & VRING_DESC_F_WRITE) {
            if (!q->allow_writable)
                return VQV_WRITABLE;
            seen_writable = 1;
            write_len += d.len;
        } else {
            if (!q->allow_readable)
                return VQV_READABLE;
            if (seen_writable)
                return VQV_ORDER;
            read_len += d.len;
        }
        if (d.len) {
            uint8_t *p = gpa_ptr(q, d.addr, d.len);
            if (p == NULL)
                return VQV_BUF_MEM;
            if (seg0 + nseg >= q->seg_cap) {
                *segs_full = 1;   /* keep checking: a violation still wins */
            } else {
                q->segs[seg0 + nseg].p = p;
                q->segs[seg0 + nseg].len = d.len;
            }
            nseg++;
            if (!(d.flags & VRING_DESC_F_WRITE))
                c->nread = nseg;
        }
        if (!(d.flags & VRING_DESC_F_NEXT))
            break;
        if (d.next >= limit)
            return VQV_NEXT_RANGE;
        idx = d.next;
    }
    if (read_len > U32_MAX || write_len > U32_MAX)
        return VQV_OVERFLOW;
    c->head = head;
    c->seg0 = seg0;
    c->nseg = nseg;
    c->read_len = read_len;
    c->write_len = write_len;
    c->desc_count = total;
    return 0;
}

/* ---------------------------------------------------------------- split queue steps */
/* avail_count: 0 and *pending, or VQV_HEAD_OOB (SplitQueue.avail_count). */
static uint32_t avail_count(struct vq_split *q, uint32_t *pending)
{
    uint32_t idx = g_rd16(&q->avail[1]);
    uint32_t n = (idx - q->last_avail) & 0xFFFF;
    if (n > q->size)
        return VQV_HEAD_OOB;
    q->seen_avail = idx;
    *pending = n;
    return 0;
}

/*
 * SplitQueue.pop without committing: 0 with *c filled (or c->head = UINT32_MAX for an
 * empty ring), or a VQV_* code.  pop_commit() then takes the chain.
 */
static uint32_t pop_peek(struct vq_split *q, uint32_t seg0, struct chain *c, uint32_t *segs_full)
{
    uint32_t last = q->last_avail, slot, head, pending, v;
    *segs_full = 0;
    c->head = UINT32_MAX;
    if (q->seen_avail == last) {
        v = avail_count(q, &pending);
        if (v)
            return v;
        if (pending == 0)
            return 0;
    }
    BARRIER();  /* 2.7.13.3: ring entries were written before idx */
    slot = last & (q->size - 1);
    head = g_rd16(&q->avail[2 + slot]);
    if (head >= q->size)
        return VQV_HEAD_RANGE;
    if (q->inflight[head])
        return VQV_HEAD_INFLIGHT;
    c->nread = 0;
    return walk_chain(q, head, seg0, c, segs_full);
}

static void pop_commit(struct vq_split *q, const struct chain *c)
{
    uint32_t slot = q->last_avail & (q->size - 1);
    q->last_avail = (q->last_avail + 1) & 0xFFFF;
    q->inflight[c->head] = c->write_len + 1;
    q->popped[slot] = (uint16_t)c->head;
    q->chains++;
    q->descriptors += c->desc_count;
    q->bytes_read += c->read_len;
}

/* SplitQueue.rewind(avail_idx) of chains popped in this burst (trusted, no checks). */
static void rewind_to(struct vq_split *q, uint32_t avail_idx)
{
    uint32_t n = (q->last_avail - avail_idx) & 0xFFFF, i;
    for (i = 0; i < n; i++)
        q->inflight[q->popped[(avail_idx + i) & (q->size - 1)]] = 0;
    q->last_avail = avail_idx & 0xFFFF;
    q->chains -= n;
}

/* Undo pop_commit of chains[0..n) entirely (counters too): the burst hands the item to the
 * Python reference, which pops them again. */
static void unpop(struct vq_split *q, const struct chain *chains, uint32_t n, uint32_t start)
{
    uint32_t i;
    for (i = 0; i < n; i++) {
        q->descriptors -= chains[i].desc_count;
        q->bytes_read -= chains[i].read_len;
    }
    rewind_to(q, start);
}

/* SplitQueue.push for a head this burst popped. */
static void push(struct vq_split *q, uint32_t head, uint32_t written)
{
    struct vring_used_elem *e = (struct vring_used_elem *)(q->used16 + 2);
    e += (q->used_idx + q->pending_used) & (q->size - 1);
    q->inflight[head] = 0;
    g_wr32(&e->id, head);
    g_wr32(&e->len, written);
    q->pending_used++;
    q->used++;
    q->bytes_written += written;
}

/* SplitQueue.enable_notifications(True) then avail_count() > 0 (0 / VQV_HEAD_OOB). */
static uint32_t rearm(struct vq_split *q, uint32_t *pending)
{
    if (q->event_idx)
        g_wr16(&q->used16[2 + 4 * q->size], g_rd16(&q->avail[1]));
    else
        g_wr16(&q->used16[0], 0);
    BARRIER();
    return avail_count(q, pending);
}

static inline int vring_need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

uint32_t vq_split_finish(struct vq_split *q, uint32_t consumed)
{
    uint32_t new_idx, old, valid, notify;
    if (q->pending_used) {
        q->used_idx = (q->used_idx + q->pending_used) & 0xFFFF;
        q->pending_used = 0;
        BARRIER();  /* 2.7.8.2: the elements before the idx */
        g_wr16(&q->used16[1], (uint16_t)q->used_idx);
        q->flushes++;
    }
    if (!consumed)
        return 0;
    BARRIER();
    /* SplitQueue.should_notify (2.7.7, 2.7.10, NOTIFY_ON_EMPTY). */
    new_idx = q->used_idx;
    old = q->signalled_used;
    valid = q->signalled_valid;
    if (valid && new_idx == old)
        return 0;
    q->signalled_used = new_idx;
    q->signalled_valid = 1;
    if (q->notify_on_empty && g_rd16(&q->avail[1]) == q->last_avail)
        notify = 1;
    else if (q->event_idx)
        notify = !valid || vring_need_event(g_rd16(&q->avail[2 + q->size]), new_idx, old);
    else
        notify = !(g_rd16(&q->avail[0]) & VRING_AVAIL_F_NO_INTERRUPT);
    if (notify)
        q->notifications_sent++;
    else
        q->notifications_suppressed++;
    return notify;
}

/* ---------------------------------------------------------------- pool (trusted) */
static inline uint8_t *buf_of(const struct fp_pool *p, uint8_t *bufs, uint8_t *large, uint32_t g,
                              uint32_t *size)
{
    if (p->b_large[g]) {
        *size = p->large_buf_size;
        return large + (size_t)p->b_buf[g] * p->large_buf_size;
    }
    *size = p->buf_size;
    return bufs + (size_t)p->b_buf[g] * p->buf_size;
}

/* Pbufpool.packet_from_bytes' buffer choice: nbufs and use_large, or 0 (Python: pool). */
static uint32_t pool_plan(const struct vq_pool *vp, uint64_t n, uint32_t *nbufs, uint32_t *use_large)
{
    const struct fp_pool *p = vp->p;
    uint64_t bs = p->buf_size, nb = n ? (n + bs - 1) / bs : 1;
    *use_large = 0;
    if (nb > p->max_frags || (n > bs && vp->num_large)) {
        uint64_t ls = p->large_buf_size, nl = n ? (n + ls - 1) / ls : 1;
        if (vp->num_large && nl <= p->max_frags) {
            if (nl <= vp->free_large_len) {
                *use_large = 1;
                nb = nl;
            } else if (nb > p->max_frags) {
                return 0;  /* alloc failure */
            }
        } else if (nb > p->max_frags) {
            return 0;  /* PoolError: never fits */
        }
    }
    /* alloc_packets(1, nb) */
    if (vp->free_pkts_len == 0)
        return 0;
    if (nb > 1 && vp->free_ext_len / (nb - 1) == 0)
        return 0;
    /* Only the tops handed in can be popped here; deeper entries are Python's. */
    if (vp->n_pkts == 0 || nb - 1 > vp->n_ext || (*use_large && nb > vp->n_large))
        return 0;
    *nbufs = (uint32_t)nb;
    return 1;
}

/* alloc_packets(1, nbufs) + the copy loop of packet_from_bytes: the frame is the chain's
 * readable bytes from offset skip (scatter from segments, or from a contiguous frame). */
static uint32_t pool_fill(struct vq_pool *vp, uint32_t nbufs, uint32_t use_large,
                          const struct vq_seg *segs, uint32_t nseg, uint64_t skip,
                          const uint8_t *flat, uint64_t n, const uint8_t *vnet)
{
    const struct fp_pool *p = vp->p;
    uint32_t idx, g, prev, k, si = 0;
    uint64_t pos = 0, soff = skip;

    idx = vp->free_pkts[--vp->n_pkts];
    vp->free_pkts_len--;
    p->pkt_state[idx] = PKT_ALLOCATED;
    p->pkt_owner[idx] = KERNEL_OWNER;
    p->pkt_len[idx] = 0;
    p->pkt_nbufs[idx] = (uint16_t)nbufs;
    p->pkt_pflags[idx] = 0;
    p->pkt_l2[idx] = 0;
    p->pkt_cstart[idx] = 0;
    p->pkt_cstuff[idx] = 0;
    p->b_doff[idx] = 0;
    p->b_dlen[idx] = 0;
    prev = idx;
    for (k = 1; k < nbufs; k++) {
        uint32_t j = vp->free_ext[--vp->n_ext];
        vp->free_ext_len--;
        g = p->num_packets + j;
        p->b_next[prev] = j;
        p->b_doff[g] = 0;
        p->b_dlen[g] = 0;
        prev = g;
    }
    p->b_next[prev] = SK_NO_INDEX;
    /* skip the segments' first skip bytes (the vnet header) */
    while (!flat && si < nseg && soff >= segs[si].len) {
        soff -= segs[si].len;
        si++;
    }
    g = idx;
    for (;;) {
        uint32_t size;
        uint8_t *base;
        uint64_t chunk;
        if (use_large) {
            uint32_t lb = vp->free_large[--vp->n_large];
            vp->free_large_len--;
            p->b_buf[g] = lb;
            p->b_large[g] = 1;
        }
        base = buf_of(p, vp->bufs, vp->large, g, &size);
        chunk = n - pos < size ? n - pos : size;
        if (flat) {
            memcpy(base, flat + pos, chunk);
        } else {
            uint64_t done = 0;
            while (done < chunk) {
                uint64_t take = segs[si].len - soff;
                if (take > chunk - done)
                    take = chunk - done;
                g_copy_from(base + done, segs[si].p + soff, take);
                done += take;
                soff += take;
                if (soff == segs[si].len) {
                    si++;
                    soff = 0;
                }
            }
        }
        p->b_doff[g] = 0;
        p->b_dlen[g] = (uint32_t)chunk;
        pos += chunk;
        if (p->b_next[g] == SK_NO_INDEX)
            break;
        g = p->num_packets + p->b_next[g];
    }
    p->pkt_len[idx] = (uint32_t)n;
    memcpy(p->pkt_vnet + (size_t)idx * NET_HDR_LEN, vnet, NET_HDR_LEN);
    p->pkt_pflags[idx] = SK_PKT_VNET_HDR;
    return idx;
}

/* Gather n bytes of the segments from offset skip into dst. */
static void gather(const struct vq_seg *segs, uint32_t nseg, uint64_t skip, uint8_t *dst, uint64_t n)
{
    uint32_t si = 0;
    uint64_t done = 0;
    while (si < nseg && skip >= segs[si].len) {
        skip -= segs[si].len;
        si++;
    }
    while (done < n && si < nseg) {
        uint64_t take = segs[si].len - skip;
        if (take > n - done)
            take = n - done;
        g_copy_from(dst + done, segs[si].p + skip, take);
        done += take;
        skip = 0;
        si++;
    }
}

/* checksum.complete_checksum in place (5.1.6.2 "Packet Transmission"). */
static void complete_checksum(uint8_t *f, uint64_t len, uint32_t start, uint32_t offset)
{
    uint64_t where = (uint64_t)start + offset, i, sum = 0;
    uint32_t csum;
    if (start >= len || where + 2 > len)
        return;
    for (i = start; i + 1 < len; i += 2)
        sum += (uint32_t)f[i] << 8 | f[i + 1];
    if (i < len)
        sum += (uint32_t)f[i] << 8;
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    csum = ~sum & 0xFFFF;
    if (csum == 0 && offset == 6)
        csum = 0xFFFF;  /* UDP: a computed 0 is sent as all ones (RFC 768) */
    f[where] = (uint8_t)(csum >> 8);
    f[where + 1] = (uint8_t)csum;
}

static int split_args_ok(const struct vq_split *q)
{
    return q->size && !(q->size & (q->size - 1)) && q->size <= 32768 && q->desc && q->avail &&
           q->used16 && q->segs && q->seg_cap;
}

/* ---------------------------------------------------------------- TX */
uint32_t vq_split_tx(struct vq_split *q, struct vq_pool *vp, uint32_t hlen, uint32_t budget,
                     uint32_t *out, struct vq_burst *b)
{
    memset(b, 0, sizeof(*b));
    if (!split_args_ok(q) || hlen > NET_HDR_LEN || hlen < 10 || !q->scratch ||
        q->scratch_cap < MAX_FRAME) {
        b->stop = VQ_STOP_BADARGS;
        return b->stop;
    }
    while (b->count < budget) {
        struct chain c;
        uint32_t v, full, nbufs, use_large, pending, pkt;
        uint8_t hdr[NET_HDR_LEN];
        uint64_t flen;

        v = pop_peek(q, 0, &c, &full);
        if (v) {
            b->stop = VQ_STOP_VIOLATION;
            b->violation = v;
            return b->stop;
        }
        if (c.head == UINT32_MAX) {
            /* 2.7.10: re-arm the kick; if buffers raced in, go on. */
            v = rearm(q, &pending);
            if (v) {
                b->stop = VQ_STOP_VIOLATION;
                b->violation = v;
                return b->stop;
            }
            if (pending)
                continue;
            b->stop = VQ_STOP_EMPTY;
            return b->stop;
        }
        if (full) {
            b->stop = VQ_STOP_SLOW;
            b->slow = VQS_SEGS;
            return b->stop;
        }
        if (c.read_len < hlen + 14u) {
            b->stop = VQ_STOP_SLOW;
            b->slow = VQS_RUNT;
            return b->stop;
        }
        if (c.read_len - hlen > MAX_FRAME) {
            b->stop = VQ_STOP_SLOW;
            b->slow = VQS_OVERSIZE;
            return b->stop;
        }
        flen = c.read_len - hlen;
        if (!pool_plan(vp, flen, &nbufs, &use_large)) {
            b->stop = VQ_STOP_SLOW;
            b->slow = VQS_POOL;
            return b->stop;
        }
        /* The chain is the reference's: pop, push (nothing written), internalize. */
        pop_commit(q, &c);
        push(q, c.head, 0);
        memset(hdr, 0, sizeof(hdr));
        gather(q->segs, c.nread, 0, hdr, hlen);
        if ((hdr[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM) && hdr[1] == VIRTIO_NET_HDR_GSO_NONE) {
            /* CSUM: the guest left the checksum to the device; complete it so every
             * consumer sees a valid frame, and drop NEEDS_CSUM from the header. */
            uint32_t cs = hdr[6] | (uint32_t)hdr[7] << 8, co = hdr[8] | (uint32_t)hdr[9] << 8;
            gather(q->segs, c.nread, hlen, q->scratch, flen);
            complete_checksum(q->scratch, flen, cs, co);
            hdr[0] = 0;
            hdr[1] = 0;
            pkt = pool_fill(vp, nbufs, use_large, NULL, 0, 0, q->scratch, flen, hdr);
        } else {
            pkt = pool_fill(vp, nbufs, use_large, q->segs, c.nread, hlen, NULL, flen, hdr);
        }
        out[b->npkts++] = pkt;
        b->count++;
        b->nbytes += flen;
    }
    b->stop = VQ_STOP_BUDGET;
    return b->stop;
}

/* ---------------------------------------------------------------- RX */
/* Scatter len bytes of src into the writable segments of c from offset 0: bytes written. */
static uint64_t write_into(const struct vq_split *q, const struct chain *c, const uint8_t *src,
                           uint64_t len)
{
    uint64_t done = 0;
    uint32_t i;
    for (i = c->nread; i < c->nseg && done < len; i++) {
        const struct vq_seg *s = &q->segs[c->seg0 + i];
        uint64_t take = s->len < len - done ? s->len : len - done;
        g_copy_to(s->p, src + done, take);
        done += take;
    }
    return done;
}

#define RX_MAX_CHAINS 256

uint32_t vq_split_rx(struct vq_split *q, const struct fp_pool *p, uint8_t *bufs, uint8_t *large,
                     uint32_t hlen, uint32_t flags, const uint32_t *pkts, uint32_t n,
                     struct vq_burst *b)
{
    struct chain chains[RX_MAX_CHAINS];
    uint32_t mergeable = flags & VQ_RX_MERGEABLE;

    memset(b, 0, sizeof(*b));
    if (!split_args_ok(q) || hlen > NET_HDR_LEN || hlen < 10 || !q->scratch ||
        q->scratch_cap < NET_HDR_LEN + MAX_FRAME) {
        b->stop = VQ_STOP_BADARGS;
        return b->stop;
    }
    while (b->count < n) {
        uint32_t pkt = pkts[b->count], v, before, pending, nch = 0, start = q->last_avail;
        uint32_t seg0 = 0, g, full, i;
        uint64_t flen = 0, total, room = 0, off;
        uint8_t *data = q->scratch;
        const uint8_t *vnet;
        static const uint8_t zero_vnet[NET_HDR_LEN];

        if (pkt >= p->num_packets || p->pkt_state[pkt] != PKT_ALLOCATED) {
            b->stop = VQ_STOP_BADARGS;
            return b->stop;
        }
        /* drain_rx: before = avail_count() */
        v = avail_count(q, &before);
        if (v)
            goto violation;
        /* _write_rx: the frame and its header, from trusted pool state */
        vnet = (p->pkt_pflags[pkt] & SK_PKT_VNET_HDR) ? p->pkt_vnet + (size_t)pkt * NET_HDR_LEN
                                                      : zero_vnet;
        if (vnet[1] != VIRTIO_NET_HDR_GSO_NONE) {
            b->stop = VQ_STOP_SLOW;
            b->slow = VQS_GSO;
            return b->stop;
        }
        if ((vnet[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM) && !(flags & VQ_RX_GUEST_CSUM)) {
            /* the reference completes the checksum for a guest without GUEST_CSUM */
            b->stop = VQ_STOP_SLOW;
            b->slow = VQS_RX_CSUM;
            return b->stop;
        }
        memcpy(data, vnet, hlen);
        g = pkt;
        for (;;) {
            uint32_t size;
            uint8_t *base = buf_of(p, bufs, large, g, &size);
            uint32_t dl = p->b_dlen[g];
            if (flen + dl > MAX_FRAME) {
                b->stop = VQ_STOP_SLOW;
                b->slow = VQS_OVERSIZE;
                return b->stop;
            }
            memcpy(data + hlen + flen, base + p->b_doff[g], dl);
            flen += dl;
            if (p->b_next[g] == SK_NO_INDEX)
                break;
            g = p->num_packets + p->b_next[g];
        }
        total = hlen + flen;
        while (room < total) {
            struct chain *c;
            if (nch == RX_MAX_CHAINS) {
                unpop(q, chains, nch, start);
                b->stop = VQ_STOP_SLOW;
                b->slow = VQS_SEGS;
                return b->stop;
            }
            v = avail_count(q, &pending);
            if (v) {
                unpop(q, chains, nch, start);
                goto violation;
            }
            if (pending == 0)
                break;
            c = &chains[nch];
            v = pop_peek(q, seg0, c, &full);
            if (v) {
                unpop(q, chains, nch, start);
                goto violation;
            }
            if (full) {
                unpop(q, chains, nch, start);
                b->stop = VQ_STOP_SLOW;
                b->slow = VQS_SEGS;
                return b->stop;
            }
            pop_commit(q, c);
            seg0 += c->nseg;
            nch++;
            room += c->write_len;
            if (!mergeable)
                break;
        }
        if (room < total) {
            if (nch && !mergeable) {
                /* one buffer without MRG_RXBUF, too small: Python drops the frame */
                unpop(q, chains, nch, start);
                b->stop = VQ_STOP_SLOW;
                b->slow = VQS_RX_SMALL;
                return b->stop;
            }
            /* no room: give the buffers back (as the reference's rewind), re-arm (2.7.10);
             * if buffers arrived meanwhile, go round again */
            rewind_to(q, start);
            v = rearm(q, &pending);
            if (v)
                goto violation;
            v = avail_count(q, &pending);
            if (v)
                goto violation;
            if (pending > before)
                continue;
            b->stop = VQ_STOP_NOROOM;
            return b->stop;
        }
        if (hlen == NET_HDR_LEN) {
            uint16_t nb = mergeable ? (uint16_t)nch : 1;
            data[10] = (uint8_t)nb;
            data[11] = (uint8_t)(nb >> 8);
        }
        off = 0;
        for (i = 0; i < nch; i++) {
            uint64_t w = write_into(q, &chains[i], data + off, total - off);
            push(q, chains[i].head, (uint32_t)w);
            off += w;
        }
        b->count++;
        b->nbytes += flen;
        if (nch > 1)
            b->merged++;
        continue;
violation:
        b->stop = VQ_STOP_VIOLATION;
        b->violation = v;
        return b->stop;
    }
    b->stop = VQ_STOP_EMPTY;
    return b->stop;
}
