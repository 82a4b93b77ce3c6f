/*
 * Bulk pool operations (see poolbatch.h): pool.py's _init_packet / _release /
 * check_kernel_held loops and ring.py's rx_enqueue, check for check and store for store.
 * Everything here is kernel-trusted state (struct fp_pool) except the metadata redzone,
 * which _release repairs and counts as pool.py does.
 */
#include <stddef.h>
#include <string.h>

#include "skywalk.h"
#include "poolbatch.h"
#include "virtq.h"
#include "pool_md.h"

void pb_init_packets(const struct fp_pool *p, const uint32_t *idxs, uint32_t n, uint32_t nbufs,
                     const uint32_t *ext)
{
    for (uint32_t i = 0; i < n; i++)
        pool_init_packet(p, idxs[i], nbufs, ext, (int64_t)i * (nbufs - 1), 1);
}

uint32_t pb_release(const struct fp_pool *p, const uint32_t *idxs, uint32_t n, uint32_t *out_ext,
                    uint32_t *out_large, struct pb_ret *r)
{
    uint32_t i, ne = 0, nl = 0, rz = 0;
    r->code = PB_OK;
    for (i = 0; i < n; i++) {
        uint32_t idx = idxs[i], g = idx;
        struct sk_md_obj *o;
        if (idx >= p->num_packets || p->pkt_state[idx] != PKT_ALLOCATED) {
            r->code = PB_DOUBLE_FREE;
            r->v[0] = idx;
            break;
        }
        p->pkt_state[idx] = PKT_FREE;
        p->pkt_owner[idx] = KERNEL_OWNER;
        o = (struct sk_md_obj *)(p->md + (size_t)idx * sizeof(struct sk_md_obj));
        if (o->pre.redzone != (SK_REDZONE_SEED ^ (uint64_t)idx)) {
            rz++;
            o->pre.redzone = SK_REDZONE_SEED ^ (uint64_t)idx;
        }
        for (;;) {
            uint32_t j;
            if (p->b_large[g]) {
                out_large[nl++] = p->b_buf[g];
                p->b_large[g] = 0;
                p->b_buf[g] = g;
            }
            j = p->b_next[g];
            p->b_next[g] = SK_NO_INDEX;
            if (j == SK_NO_INDEX)
                break;
            out_ext[ne++] = j;
            g = p->num_packets + j;
        }
    }
    r->count = i;
    r->n_ext = ne;
    r->n_large = nl;
    r->redzone_faults = rz;
    return r->code;
}

uint32_t pb_release_lists(const struct fp_pool *p, const uint32_t *idxs, uint32_t n,
                          struct fl_stack *pk, struct fl_stack *ext, struct fl_stack *large,
                          struct pb_ret *r)
{
    uint64_t ne = 0, nl = 0;
    /* What the release will push, counted first: the lists must have room for it. */
    for (uint32_t i = 0; i < n; i++) {
        uint32_t idx = idxs[i], g = idx;
        if (idx >= p->num_packets || p->pkt_state[idx] != PKT_ALLOCATED)
            break;  /* pb_release stops here too */
        for (uint32_t steps = 0;; steps++) {
            uint32_t j;
            if (steps > p->max_frags) {
                r->code = PB_FALLBACK;  /* a chain longer than a packet can be */
                return r->code;
            }
            nl += p->b_large[g] != 0;
            j = p->b_next[g];
            if (j == SK_NO_INDEX)
                break;
            ne++;
            g = p->num_packets + j;
        }
    }
    if (pk->n > pk->cap || ext->n > ext->cap || large->n > large->cap ||
        n > pk->cap - pk->n || ne > ext->cap - ext->n || nl > large->cap - large->n) {
        r->code = PB_FALLBACK;
        return r->code;
    }
    pb_release(p, idxs, n, ext->v + ext->n, large->v + large->n, r);
    ext->n += r->n_ext;
    large->n += r->n_large;
    memcpy(pk->v + pk->n, idxs, (size_t)r->count * 4);
    pk->n += r->count;
    return r->code;
}

uint32_t pb_check_kernel_held(const struct fp_pool *p, const uint32_t *idxs, uint32_t n,
                              uint8_t *mark, struct pb_ret *r)
{
    uint32_t i, code = PB_OK, bad = 0;
    /* pool.py checks "listed twice" over the whole batch before any per-packet check. */
    for (i = 0; i < n; i++) {
        uint32_t idx = idxs[i];
        if (idx >= p->num_packets) {
            code = PB_FALLBACK;
            break;
        }
        if (mark[idx]) {
            code = PB_TWICE;
            break;
        }
        mark[idx] = 1;
    }
    for (bad = 0; bad < i; bad++)
        mark[idxs[bad]] = 0;
    if (code == PB_OK) {
        for (i = 0; i < n; i++) {
            uint32_t idx = idxs[i];
            if (idx >= p->num_packets || p->pkt_state[idx] != PKT_ALLOCATED) {
                code = PB_NOT_ALLOCATED;
                r->v[0] = idx;
                break;
            }
            if (p->pkt_owner[idx] != KERNEL_OWNER) {
                code = PB_HELD;
                r->v[0] = idx;
                r->v[1] = p->pkt_owner[idx];
                break;
            }
        }
    }
    r->code = code;
    r->count = i;
    return code;
}

uint32_t pb_rx_enqueue(uint32_t *ksd, uint32_t nslots, uint32_t kt, const uint32_t *idxs,
                       uint32_t take)
{
    uint32_t i;
    for (i = 0; i < take; i++) {
        ksd[kt] = idxs[i];
        kt = kt + 1 < nslots ? kt + 1 : 0;
    }
    return kt;
}
