/*
 * Compiled bursts of a channel's user half: channel.py's send and recv loops (the Python
 * reference), one call per burst.  Same walk, same checks, same order, so a frame staged or
 * read here is byte-for-byte what the Python loops would have staged or read; what the
 * Python wrapper (vdev/skywalk/chanbatch.py) keeps is the syncs and the error messages.
 *
 * The user trusts what the kernel published but range-checks every index read back from the
 * arena before touching memory (channel.py's _md / _buflets / _buffer checks); each value
 * is read once into a local, so what was checked is what is used.
 */
#include <string.h>

#include "skywalk.h"
#include "chanbatch.h"

#define RD(x) (*(const volatile __typeof__(x) *)&(x))
#define SD_LEN_MAX 0xFFFFu

static inline struct sk_ring *ring_hdr(const struct cb_arena *a, const struct cb_ring *g)
{
    return (struct sk_ring *)(a->base + g->off);
}

static inline struct sk_slot *slot_at(const struct cb_arena *a, const struct cb_ring *g, uint32_t s)
{
    return (struct sk_slot *)(a->base + g->slots_off + (uint64_t)s * sizeof(struct sk_slot));
}

static inline uint32_t next_slot(const struct cb_ring *g, uint32_t s)
{
    return s + 1 < g->n ? s + 1 : 0;
}

/* os_channel_available_slot_count for TX-like rings (TX, FREE): writable slots. */
static inline uint32_t tx_room(const struct sk_ring *h, uint32_t n, uint32_t head)
{
    uint32_t kh = RD(h->ring_khead) % n;
    uint32_t d = (head + n - kh) % n;
    return n - d - 1;
}

/* ... and for RX-like rings (RX, ALLOC, EVENT): readable slots. */
static inline uint32_t rx_avail(const struct sk_ring *h, uint32_t n, uint32_t head)
{
    uint32_t t = RD(h->ring_tail) % n;
    return (t + n - head) % n;
}

static int ring_ok(const struct cb_arena *a, const struct cb_ring *g)
{
    return g->n >= 2 && g->off + sizeof(struct sk_ring) <= a->size &&
           g->slots_off + (uint64_t)g->n * sizeof(struct sk_slot) <= a->size;
}

static uint32_t bad(struct cb_ret *r, uint32_t what, uint64_t value)
{
    r->code = CB_BAD_INDEX;
    r->v[0] = what;
    r->v[1] = value;
    return CB_BAD_INDEX;
}

/* A walk over one packet's buflets in the user copy of its chain (Channel._buflets). */
struct walk {
    struct sk_packet *pk;
    struct sk_buflet *b;
    uint32_t cnt;
    uint32_t k;
};

static int buffer_of(const struct cb_arena *a, const struct sk_buflet *b, uint8_t **buf,
                     uint32_t *size, struct cb_ret *r)
{
    uint32_t large = RD(b->flags) & SK_BUFLET_LARGE;
    uint32_t bi = RD(b->buf_idx);
    if (large) {
        if (bi >= a->num_large_bufs)
            return bad(r, CB_BAD_BUFFER, bi);
        *size = a->large_buf_size;
        *buf = a->base + a->large_buf_off + (uint64_t)bi * a->large_buf_size;
    } else {
        if (bi >= a->num_bufs)
            return bad(r, CB_BAD_BUFFER, bi);
        *size = a->buf_size;
        *buf = a->base + a->buf_off + (uint64_t)bi * a->buf_size;
    }
    return 0;
}

/* Advance w to the next buflet (Channel._buflets: follow next_idx while fewer than bufs_cnt
 * buflets were visited); returns 1 with w->b set, 0 at the end, CB_BAD_INDEX on a bad link. */
static int walk_next(const struct cb_arena *a, struct walk *w, struct cb_ret *r)
{
    uint32_t nxt;
    if (w->k == 0) {
        w->b = &w->pk->buf0;
        w->k = 1;
        return 1;
    }
    nxt = RD(w->b->next_idx);
    if (nxt == SK_NO_INDEX || w->k >= w->cnt)
        return 0;
    if (nxt >= a->num_buflets) {
        bad(r, CB_BAD_BUFLET, nxt);
        return -1;
    }
    w->b = (struct sk_buflet *)(a->base + a->buflet_off + (uint64_t)nxt * sizeof(struct sk_buflet));
    w->k++;
    return 1;
}

/* Channel._buflets builds the whole buflet list (checking every link) before packet_write or
 * packet_read looks at any buffer, so a bad link is what is reported even when an earlier
 * buflet's buffer is bad too: walk the links first.  0, or -1 with r saying which link. */
static int check_links(const struct cb_arena *a, struct sk_packet *pk, struct cb_ret *r)
{
    struct walk w;
    int st;
    w.pk = pk;
    w.cnt = RD(pk->bufs_cnt);
    w.k = 0;
    while ((st = walk_next(a, &w, r)) == 1)
        ;
    return st;
}

static struct sk_packet *packet_at(const struct cb_arena *a, uint32_t pkt)
{
    return &((struct sk_md_obj *)(a->base + a->md_off + (uint64_t)pkt * sizeof(struct sk_md_obj)))->pkt;
}

uint32_t cb_send(const struct cb_arena *a, const struct cb_ring *tx, const struct cb_ring *alloc,
                 const uint8_t *data, const uint32_t *offs, const uint32_t *lens, uint32_t count,
                 struct cb_ret *r)
{
    struct sk_ring *th, *ah;
    uint32_t thead, ahead, i = 0;
    uint64_t nbytes = 0;

    r->count = 0;
    r->nbytes = 0;
    if (!ring_ok(a, tx) || !ring_ok(a, alloc))
        return bad(r, CB_BAD_WINDOW, 0);
    th = ring_hdr(a, tx);
    ah = ring_hdr(a, alloc);
    thead = RD(th->ring_head) % tx->n;
    ahead = RD(ah->ring_head) % alloc->n;
    r->code = CB_OK;
    for (; i < count; i++) {
        struct sk_slot *as, *ts;
        struct sk_packet *pk;
        struct walk w;
        uint32_t pkt, n = lens[i], pos = 0;
        const uint8_t *src = data + offs[i];
        int st;
        if (tx_room(th, tx->n, thead) == 0) {
            r->code = CB_TX_FULL;
            break;
        }
        if (rx_avail(ah, alloc->n, ahead) == 0) {
            r->code = CB_ALLOC_EMPTY;
            break;
        }
        /* packet_alloc_batch: take the head slot's packet and detach it. */
        as = slot_at(a, alloc, ahead);
        pkt = RD(as->sd_md_idx);
        as->sd_flags = 0;
        ahead = next_slot(alloc, ahead);
        r->pkt = pkt;
        if (pkt >= a->num_packets) {
            bad(r, CB_BAD_PACKET, pkt);
            break;
        }
        /* packet_write: fill the buflets in chain order, no headroom. */
        pk = packet_at(a, pkt);
        if (check_links(a, pk, r))
            break;
        w.pk = pk;
        w.cnt = RD(pk->bufs_cnt);
        w.k = 0;
        while ((st = walk_next(a, &w, r)) == 1) {
            uint8_t *buf;
            uint32_t size, chunk;
            if (buffer_of(a, w.b, &buf, &size, r))
                break;
            chunk = size < n - pos ? size : n - pos;
            if (chunk)
                memcpy(buf, src + pos, chunk);
            w.b->doff = 0;
            w.b->dlen = chunk;
            pos += chunk;
        }
        if (st != 0)
            break;  /* r already says which index was bad */
        if (pos < n) {
            r->code = CB_TOO_BIG;
            r->v[0] = pkt;
            r->v[1] = pos;
            break;
        }
        pk->len = n;
        pk->headroom = 0;
        pk->pflags = RD(pk->pflags) & ~SK_PKT_VNET_HDR;
        ts = slot_at(a, tx, thead);
        ts->sd_md_idx = pkt;
        ts->sd_flags = SK_SD_VALID;
        ts->sd_len = (uint16_t)(n <= SD_LEN_MAX ? n : SD_LEN_MAX);
        thead = next_slot(tx, thead);
        nbytes += n;
    }
    /* Publish the heads after the slots they cover (the kernel reads them at sync). */
    __atomic_store_n(&ah->ring_head, ahead, __ATOMIC_RELEASE);
    __atomic_store_n(&th->ring_head, thead, __ATOMIC_RELEASE);
    r->count = i;
    r->nbytes = nbytes;
    return r->code;
}

uint32_t cb_recv(const struct cb_arena *a, const struct cb_ring *rx, const struct cb_ring *fr,
                 uint32_t max, uint8_t *out, uint64_t out_cap, uint32_t *lens, struct cb_ret *r)
{
    struct sk_ring *rh, *fh;
    uint32_t s, tail, fhead, count = 0;
    uint64_t nbytes = 0;

    r->count = 0;
    r->nbytes = 0;
    if (!ring_ok(a, rx) || !ring_ok(a, fr))
        return bad(r, CB_BAD_WINDOW, 0);
    rh = ring_hdr(a, rx);
    fh = ring_hdr(a, fr);
    s = RD(rh->ring_head) % rx->n;
    tail = RD(rh->ring_tail) % rx->n;
    fhead = RD(fh->ring_head) % fr->n;
    r->code = CB_OK;
    while (s != tail && count < max) {
        struct sk_slot *sl = slot_at(a, rx, s);
        if (RD(sl->sd_flags) & SK_SD_VALID) {
            struct sk_packet *pk;
            struct sk_slot *fs;
            struct walk w;
            uint32_t pkt = RD(sl->sd_md_idx);
            uint64_t len = 0;
            int st;
            r->pkt = pkt;
            if (pkt >= a->num_packets) {
                bad(r, CB_BAD_PACKET, pkt);
                break;
            }
            if (tx_room(fh, fr->n, fhead) == 0) {
                r->code = CB_FREE_FULL;
                break;
            }
            /* packet_read: the data windows of the user copy, each inside its buffer, as
             * many buflets as bufs_cnt says (a looped chain is read as the Python loop
             * reads it).  Copied as they are checked: out beyond nbytes is scratch until
             * the frame is counted, so a refusal half-way leaves nothing behind. */
            pk = packet_at(a, pkt);
            if (check_links(a, pk, r))
                break;
            w.pk = pk;
            w.cnt = RD(pk->bufs_cnt);
            w.k = 0;
            while ((st = walk_next(a, &w, r)) == 1) {
                uint8_t *buf;
                uint32_t size, doff, dlen;
                if (buffer_of(a, w.b, &buf, &size, r)) {
                    st = -1;
                    break;
                }
                doff = RD(w.b->doff);
                dlen = RD(w.b->dlen);
                if ((uint64_t)doff + dlen > size) {
                    bad(r, CB_BAD_WINDOW, pkt);
                    st = -1;
                    break;
                }
                if (out != NULL) {
                    if (nbytes + len + dlen > out_cap) {
                        r->code = CB_OUT_FULL;
                        st = -1;
                        break;
                    }
                    memcpy(out + nbytes + len, buf + doff, dlen);
                }
                len += dlen;
            }
            if (st != 0)
                break;
            if (lens != NULL)
                lens[count] = (uint32_t)len;
            nbytes += len;
            count++;
            sl->sd_flags = 0;  /* slot_detach_packet */
            fs = slot_at(a, fr, fhead);  /* packet_free_batch */
            fs->sd_md_idx = pkt;
            fs->sd_flags = SK_SD_VALID;
            fhead = next_slot(fr, fhead);
        }
        s = next_slot(rx, s);
    }
    /* The FREE head is written only when packets were handed back, as packet_free_batch
     * writes it: a scribbled head is otherwise left for the kernel to judge at its sync. */
    if (count)
        __atomic_store_n(&fh->ring_head, fhead, __ATOMIC_RELEASE);
    __atomic_store_n(&rh->ring_head, s, __ATOMIC_RELEASE);
    r->count = count;
    r->nbytes = nbytes;
    return r->code;
}
