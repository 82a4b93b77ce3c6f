/*
 * Compiled fast path of vdev/skywalk/slotwork.py: the per-slot loops of the
 * kernel half (internalize / externalize, TX take, FREE take, RX release
 * check, RX publish).  slotwork.py is the Python reference implementation;
 * this file must stay check-for-check identical to it: the same checks in the
 * same order, the same side effects on the trusted arrays and the shared
 * arena, the same byte counts.  Failures come back as codes plus numbers
 * (struct fp_ret) and fastglue.py builds slotwork's message from them, so both
 * backends report identical details.
 *
 * Trust: everything behind struct fp_pool / fp_ring except the arena regions
 * is kernel-trusted.  Every value read from the arena goes through RD() (one
 * volatile load, so a racing client cannot make a checked value differ from
 * the used one) and is range-checked before it is used as an index; indices
 * are only ever taken from trusted arrays.
 */
#include <string.h>

#include "skywalk.h"
#include "fastpath.h"
#include "pool_md.h"

/* One ring's slot array as the kernel sees it (all trusted values). */
struct fp_ring {
    uint8_t *base;                /* start of the ring region */
    uint64_t region_bytes;        /* its size: slots must lie inside */
    uint64_t slots_w32;           /* slot array, in 32-bit words from base */
    uint32_t n;                   /* number of slots */
};

#define RD(x) (*(const volatile __typeof__(x) *)&(x))
#define VNET_LEN 12
#define VNET_F_NEEDS_CSUM 1
#define PKT_KNOWN_FLAGS (SK_PKT_VNET_HDR | SK_PKT_CSUM_PARTIAL)
#define SD_LEN_MAX 0xFFFFu

static inline struct sk_md_obj *md_at(const struct fp_pool *p, uint32_t idx)
{
    return (struct sk_md_obj *)(p->md + (size_t)idx * sizeof(struct sk_md_obj));
}

static inline struct sk_buflet *bl_at(const struct fp_pool *p, uint32_t j)
{
    return (struct sk_buflet *)(p->bl + (size_t)j * sizeof(struct sk_buflet));
}

static inline struct sk_slot *slot_at(const struct fp_ring *g, uint32_t s)
{
    return (struct sk_slot *)(g->base + g->slots_w32 * 4 + (size_t)s * sizeof(struct sk_slot));
}

static inline uint32_t next_slot(const struct fp_ring *g, uint32_t s)
{
    return s + 1 < g->n ? s + 1 : 0;
}

static int ring_ok(const struct fp_ring *g, uint32_t start, uint32_t end)
{
    if (g->n == 0 || start >= g->n || end >= g->n)
        return 0;
    if (g->slots_w32 > g->region_bytes / 4)
        return 0;
    return g->slots_w32 * 4 + (uint64_t)g->n * sizeof(struct sk_slot) <= g->region_bytes;
}

static uint32_t ifail(struct fp_ret *r, uint32_t detail, uint64_t a, uint64_t b, uint64_t c,
                      uint64_t d, uint64_t e)
{
    r->code = FP_INTERNALIZE;
    r->detail = detail;
    r->v[0] = a;
    r->v[1] = b;
    r->v[2] = c;
    r->v[3] = d;
    r->v[4] = e;
    return FP_INTERNALIZE;
}

uint32_t fp_internalize(const struct fp_pool *p, uint32_t idx, struct fp_ret *r)
{
    struct sk_md_obj *o = md_at(p, idx);
    struct sk_packet *pk = &o->pkt;
    uint32_t more[128];  /* doff, dlen of buflets 1..: max_frags <= 64 */
    uint32_t nmore = 0;
    uint32_t maxf = p->max_frags;
    uint32_t cnt, k, g = idx;
    uint64_t total = 0;
    uint32_t doff0 = 0, dlen0 = 0, dlim0 = 0;
    struct sk_buflet *b = &pk->buf0;

    if (RD(o->pre.redzone) != (SK_REDZONE_SEED ^ (uint64_t)idx))
        return ifail(r, FPD_REDZONE, idx, 0, 0, 0, 0);
    if (RD(pk->bufs_max) != maxf)
        return ifail(r, FPD_BUFS_MAX, idx, 0, 0, 0, 0);
    cnt = RD(pk->bufs_cnt);
    if (!(1 <= cnt && cnt <= maxf))
        return ifail(r, FPD_BUFS_CNT_RANGE, idx, cnt, maxf, 0, 0);
    if (cnt != p->pkt_nbufs[idx])
        return ifail(r, FPD_BUFS_CNT_CHAIN, idx, cnt, p->pkt_nbufs[idx], 0, 0);
    for (k = 0; k < cnt; k++) {
        uint8_t large = p->b_large[g];
        uint32_t dlim, doff, dlen, nxt, tnxt;
        if (RD(b->buf_idx) != p->b_buf[g])
            return ifail(r, FPD_BUF_IDX, idx, k, 0, 0, 0);
        if ((RD(b->flags) & SK_BUFLET_LARGE) != (large ? SK_BUFLET_LARGE : 0))
            return ifail(r, FPD_LARGE_FLAG, idx, k, 0, 0, 0);
        dlim = large ? p->large_buf_size : p->buf_size;
        if (RD(b->dlim) != dlim)
            return ifail(r, FPD_DLIM, idx, k, 0, 0, 0);
        doff = RD(b->doff);
        dlen = RD(b->dlen);
        if ((uint64_t)doff + dlen > dlim)
            return ifail(r, FPD_DOFF_DLEN, idx, k, doff, dlen, dlim);
        nxt = RD(b->next_idx);
        tnxt = p->b_next[g];
        if (nxt != tnxt)
            return ifail(r, FPD_NEXT, idx, k, nxt, tnxt, 0);
        if (k == 0) {
            doff0 = doff;
            dlen0 = dlen;
            dlim0 = dlim;
        } else {
            more[2 * nmore] = doff;
            more[2 * nmore + 1] = dlen;
            nmore++;
        }
        total += dlen;
        if (tnxt == SK_NO_INDEX || k + 1 >= cnt)
            break;
        if (tnxt >= p->num_ext) {  /* trusted chain corrupt (Python: IndexError) */
            r->code = FP_INDEX_ERROR;
            r->v[0] = tnxt;
            return FP_INDEX_ERROR;
        }
        g = p->num_packets + tnxt;  /* the trusted link, equal to the checked user one */
        b = bl_at(p, tnxt);
    }
    {
        uint32_t plen = RD(pk->len);
        uint32_t headroom, l2, pflags, cstart = 0, cstuff = 0;
        if (plen != total)
            return ifail(r, FPD_LEN_SUM, idx, plen, total, 0, 0);
        headroom = RD(pk->headroom);
        if (headroom != doff0)
            return ifail(r, FPD_HEADROOM, idx, headroom, doff0, 0, 0);
        l2 = RD(pk->l2_len);
        if (headroom + l2 >= dlim0)
            return ifail(r, FPD_L2_LEN, idx, 0, 0, 0, 0);
        pflags = RD(pk->pflags);
        if (pflags & ~(uint32_t)PKT_KNOWN_FLAGS)
            return ifail(r, FPD_PFLAGS, idx, pflags, 0, 0, 0);
        if (pflags & SK_PKT_CSUM_PARTIAL) {
            cstart = RD(pk->csum_start);
            cstuff = RD(pk->csum_stuff);
            if (cstart >= plen || (uint64_t)cstuff + 2 > plen)
                return ifail(r, FPD_CSUM, idx, cstart, cstuff, plen, 0);
        }
        if (pflags & SK_PKT_VNET_HDR) {
            if (RD(pk->vnet.flags) & VNET_F_NEEDS_CSUM) {
                uint32_t vstart = RD(pk->vnet.csum_start);
                uint32_t voff = RD(pk->vnet.csum_offset);
                if ((uint64_t)vstart + voff + 2 > plen)
                    return ifail(r, FPD_VNET_CSUM, idx, vstart, voff, 0, 0);
            }
        }
        /* Everything checked: adopt the user's windows and offload fields. */
        p->b_doff[idx] = doff0;
        p->b_dlen[idx] = dlen0;
        g = idx;
        for (k = 0; k < nmore; k++) {
            g = p->num_packets + p->b_next[g];
            p->b_doff[g] = more[2 * k];
            p->b_dlen[g] = more[2 * k + 1];
        }
        p->pkt_len[idx] = plen;
        p->pkt_pflags[idx] = (uint16_t)pflags;
        p->pkt_l2[idx] = (uint16_t)l2;
        p->pkt_cstart[idx] = (uint16_t)cstart;
        p->pkt_cstuff[idx] = (uint16_t)cstuff;
        if (pflags & SK_PKT_VNET_HDR) {
            const volatile uint8_t *src = (const volatile uint8_t *)&pk->vnet;
            uint8_t *dst = p->pkt_vnet + (size_t)idx * VNET_LEN;
            for (k = 0; k < VNET_LEN; k++)
                dst[k] = src[k];
        }
    }
    return FP_OK;
}

uint32_t fp_externalize(const struct fp_pool *p, uint32_t idx, struct fp_ret *r)
{
    struct sk_md_obj *o = md_at(p, idx);
    struct sk_packet *pk = &o->pkt;
    struct sk_buflet *b = &pk->buf0;
    uint16_t pflags = p->pkt_pflags[idx];
    uint32_t g = idx, hr = p->b_doff[idx];

    o->pre.redzone = SK_REDZONE_SEED ^ (uint64_t)idx;
    pk->idx = idx;
    pk->len = p->pkt_len[idx];
    pk->qflags = SK_QUM_FINALIZED;
    pk->pflags = pflags;
    pk->bufs_cnt = p->pkt_nbufs[idx];
    pk->bufs_max = (uint16_t)p->max_frags;
    if (hr > 0xFFFF) {  /* Python: OverflowError storing into the 16-bit view */
        r->code = FP_OVERFLOW;
        r->v[0] = hr;
        return FP_OVERFLOW;
    }
    pk->headroom = (uint16_t)hr;
    pk->l2_len = p->pkt_l2[idx];
    pk->csum_start = p->pkt_cstart[idx];
    pk->csum_stuff = p->pkt_cstuff[idx];
    if (pflags & SK_PKT_VNET_HDR)
        memcpy(&pk->vnet, p->pkt_vnet + (size_t)idx * VNET_LEN, VNET_LEN);
    for (;;) {
        uint8_t large = p->b_large[g];
        uint32_t nxt = p->b_next[g];
        b->buf_idx = p->b_buf[g];
        b->doff = p->b_doff[g];
        b->dlen = p->b_dlen[g];
        b->dlim = large ? p->large_buf_size : p->buf_size;
        b->next_idx = nxt;
        b->flags = large ? SK_BUFLET_LARGE : 0;
        if (nxt == SK_NO_INDEX)
            return FP_OK;
        if (nxt >= p->num_ext) {  /* trusted chain corrupt (Python: IndexError) */
            r->code = FP_INDEX_ERROR;
            r->v[0] = nxt;
            return FP_INDEX_ERROR;
        }
        g = p->num_packets + nxt;
        b = bl_at(p, nxt);
    }
}

uint32_t fp_tx_take(const struct fp_pool *p, int32_t owner, uint8_t *ring, uint64_t ring_bytes, uint64_t slots_w32, uint32_t n,
                    uint32_t start, uint32_t end, uint32_t *out, struct fp_ret *r)
{
    const struct fp_ring ring_s = {ring, ring_bytes, slots_w32, n}, *g = &ring_s;
    uint32_t s = start, count = 0;
    uint64_t nbytes = 0;

    r->count = 0;
    if (!ring_ok(g, start, end)) {
        r->code = FP_BADARGS;
        return FP_BADARGS;
    }
    while (s != end) {
        struct sk_slot *sl = slot_at(g, s);
        uint32_t idx = RD(sl->sd_md_idx);
        uint32_t valid = RD(sl->sd_flags) & SK_SD_VALID;
        uint32_t uidx;
        if (!(valid && idx < p->num_packets && p->pkt_state[idx] && p->pkt_owner[idx] == owner)) {
            r->code = FP_UNALLOCATED;
            r->slot = s;
            r->count = count;
            r->v[0] = valid;
            r->v[1] = idx;
            return FP_UNALLOCATED;
        }
        p->pkt_owner[idx] = KERNEL_OWNER;
        out[count++] = idx;
        uidx = RD(md_at(p, idx)->pkt.idx);
        if (uidx != idx) {
            r->code = FP_QUM_IDX;
            r->slot = s;
            r->count = count;
            r->v[0] = idx;
            r->v[1] = uidx;
            return FP_QUM_IDX;
        }
        if (fp_internalize(p, idx, r) != FP_OK) {
            r->slot = s;
            r->count = count;
            return r->code;
        }
        nbytes += p->pkt_len[idx];
        sl->sd_md_idx = SK_NO_INDEX;
        sl->sd_flags = 0;
        sl->sd_len = 0;
        s = next_slot(g, s);
    }
    r->code = FP_OK;
    r->count = count;
    r->nbytes = nbytes;
    return FP_OK;
}

uint32_t fp_free_take(const struct fp_pool *p, int32_t owner, uint8_t *ring, uint64_t ring_bytes, uint64_t slots_w32, uint32_t n,
                      uint32_t start, uint32_t end, uint32_t *out, struct fp_ret *r)
{
    const struct fp_ring ring_s = {ring, ring_bytes, slots_w32, n}, *g = &ring_s;
    uint32_t s = start, count = 0;

    r->count = 0;
    if (!ring_ok(g, start, end)) {
        r->code = FP_BADARGS;
        return FP_BADARGS;
    }
    while (s != end) {
        struct sk_slot *sl = slot_at(g, s);
        if (RD(sl->sd_flags) & SK_SD_VALID) {
            uint32_t idx = RD(sl->sd_md_idx);
            if (!(idx < p->num_packets && p->pkt_state[idx] == 1 &&
                  p->pkt_owner[idx] == owner)) {
                r->code = FP_UNALLOCATED;
                r->slot = s;
                r->count = count;
                r->v[0] = 1;
                r->v[1] = idx;
                return FP_UNALLOCATED;
            }
            p->pkt_owner[idx] = KERNEL_OWNER;
            out[count++] = idx;
        }
        sl->sd_md_idx = SK_NO_INDEX;
        sl->sd_flags = 0;
        sl->sd_len = 0;
        s = next_slot(g, s);
    }
    r->code = FP_OK;
    r->count = count;
    return FP_OK;
}

uint32_t fp_rx_release_check(uint8_t *ring, uint64_t ring_bytes, uint64_t slots_w32, uint32_t n,
                             uint32_t start, uint32_t end,
                             const uint32_t *klen, struct fp_ret *r)
{
    const struct fp_ring ring_s = {ring, ring_bytes, slots_w32, n}, *g = &ring_s;
    uint32_t s = start;
    uint64_t nbytes = 0;

    if (!ring_ok(g, start, end)) {
        r->code = FP_BADARGS;
        return FP_BADARGS;
    }
    while (s != end) {
        struct sk_slot *sl = slot_at(g, s);
        if (RD(sl->sd_flags) & SK_SD_VALID) {
            r->code = FP_NOT_DETACHED;
            r->slot = s;
            r->v[0] = RD(sl->sd_md_idx);
            return FP_NOT_DETACHED;
        }
        if (klen != NULL) {
            uint32_t ulen = RD(sl->sd_len);
            uint32_t ln = klen[s];
            uint32_t pub = ln <= SD_LEN_MAX ? ln : SD_LEN_MAX;
            if (ulen != pub) {
                r->code = FP_READY_BYTES;
                r->slot = s;
                r->v[0] = ulen;
                r->v[1] = pub;
                return FP_READY_BYTES;
            }
            nbytes += ln;
        }
        s = next_slot(g, s);
    }
    r->code = FP_OK;
    r->nbytes = nbytes;
    return FP_OK;
}

uint32_t fp_rx_publish(const struct fp_pool *p, int32_t owner, uint8_t *ring, uint64_t ring_bytes, uint64_t slots_w32, uint32_t n,
                       uint32_t start, uint32_t end, uint32_t *ksd, uint32_t *klen,
                       uint32_t *out, struct fp_ret *r)
{
    const struct fp_ring ring_s = {ring, ring_bytes, slots_w32, n}, *g = &ring_s;
    uint32_t s = start, count = 0;
    uint64_t nbytes = 0;

    r->count = 0;
    if (!ring_ok(g, start, end)) {
        r->code = FP_BADARGS;
        return FP_BADARGS;
    }
    while (s != end) {
        uint32_t idx = ksd[s];
        uint32_t ln, sdl;
        struct sk_slot *sl;
        ksd[s] = SK_NO_INDEX;
        if (idx >= p->num_packets) {  /* trusted queue corrupt (Python: IndexError) */
            r->code = FP_INDEX_ERROR;
            r->slot = s;
            r->count = count;
            r->v[0] = idx;
            return FP_INDEX_ERROR;
        }
        if (p->pkt_owner[idx] != KERNEL_OWNER) {
            r->code = FP_POOL_ERROR;
            r->slot = s;
            r->count = count;
            r->v[0] = idx;
            r->v[1] = (uint64_t)(int64_t)p->pkt_owner[idx];
            return FP_POOL_ERROR;
        }
        p->pkt_owner[idx] = owner;
        out[count++] = idx;
        if (fp_externalize(p, idx, r) != FP_OK) {
            r->slot = s;
            r->count = count;
            return r->code;
        }
        ln = p->pkt_len[idx];
        sdl = ln <= SD_LEN_MAX ? ln : SD_LEN_MAX;
        sl = slot_at(g, s);
        sl->sd_md_idx = idx;
        sl->sd_flags = SK_SD_VALID;
        sl->sd_len = (uint16_t)sdl;
        if (klen != NULL)
            klen[s] = ln;
        nbytes += ln;
        s = next_slot(g, s);
    }
    r->code = FP_OK;
    r->count = count;
    r->nbytes = nbytes;
    return FP_OK;
}
