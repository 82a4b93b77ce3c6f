/*
 * The pool's trusted per-packet state as every compiled loop writes it (private to
 * vdev/native/: no FP-CDEF block, so nothing here is exported to Python).
 *
 * Pbufpool (vdev/skywalk/pool.py) is the reference: an allocated packet is kernel-owned,
 * empty, with its first buflet and each chained external buflet reset and the chain ended.
 */
#ifndef VDEV_NATIVE_POOL_MD_H
#define VDEV_NATIVE_POOL_MD_H

#include <stdint.h>

#include "skywalk.h"
#include "fastpath.h"

#define KERNEL_OWNER (-1)
#define PKT_FREE 0
#define PKT_ALLOCATED 1

/* Initialize packet idx as allocated with nbufs buflets; the nbufs - 1 external buflets are
 * ext[first], ext[first + step], ... (step +1 for a batch's array, -1 for popping a free
 * list from its top). */
static inline void pool_init_packet(const struct fp_pool *p, uint32_t idx, uint32_t nbufs,
                                    const uint32_t *ext, int64_t first, int64_t step)
{
    uint32_t prev = idx;
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
    for (uint32_t k = 1; k < nbufs; k++) {
        uint32_t j = ext[first + step * (int64_t)(k - 1)], g = p->num_packets + j;
        p->b_next[prev] = j;
        p->b_doff[g] = 0;
        p->b_dlen[g] = 0;
        prev = g;
    }
    p->b_next[prev] = SK_NO_INDEX;
}

#endif
