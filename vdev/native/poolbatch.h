/*
 * Bulk pool operations of the kernel half (vdev/skywalk/pool.py's alloc / release loops and
 * the RX enqueue of vdev/skywalk/ring.py), over the same trusted arrays as fastpath.c
 * (struct fp_pool).  The free lists stay Python lists: the caller slices what to take off
 * them and extends them with what these functions report freed, in the same order the
 * Python loops would have.
 */
#ifndef VDEV_NATIVE_POOLBATCH_H
#define VDEV_NATIVE_POOLBATCH_H

#include <stdint.h>

#include "fastpath.h"

/* FP-CDEF-BEGIN */
#define PB_OK 0
#define PB_DOUBLE_FREE 1     /* pb_release: idxs[count] is not allocated (v[0] = idx) */
#define PB_NOT_ALLOCATED 2   /* pb_check_kernel_held: idxs[count] not allocated */
#define PB_HELD 3            /* ... held by owner v[1] */
#define PB_TWICE 4           /* ... listed twice in one batch */
#define PB_FALLBACK 5        /* an index out of range: let pool.py's own check word it */

struct pb_ret {
    uint32_t code;
    uint32_t count;          /* packets done before the failure */
    uint32_t n_ext;          /* external buflets written to out_ext */
    uint32_t n_large;        /* large buffers written to out_large */
    uint32_t redzone_faults;
    uint32_t _pad;
    int64_t v[2];
};

/* Pbufpool._init_packet for idxs[0..n): ext holds the n * (nbufs - 1) external buflets
 * in the order fe.pop() would have produced them. */
void pb_init_packets(const struct fp_pool *p, const uint32_t *idxs, uint32_t n, uint32_t nbufs,
                     const uint32_t *ext);

/* Pbufpool._release for idxs[0..n): stops at a double free. */
uint32_t pb_release(const struct fp_pool *p, const uint32_t *idxs, uint32_t n, uint32_t *out_ext,
                    uint32_t *out_large, struct pb_ret *r);

/* pb_release pushing straight onto the pool's free lists (vdev/skywalk/freelist.py): the
 * freed external buflets, large buffers, then the released packets, in that order.
 * PB_FALLBACK, with nothing changed, when a list could not hold them. */
struct fl_stack;
uint32_t pb_release_lists(const struct fp_pool *p, const uint32_t *idxs, uint32_t n,
                          struct fl_stack *pk, struct fl_stack *ext, struct fl_stack *large,
                          struct pb_ret *r);

/* Pbufpool.check_kernel_held; mark is scratch of num_packets bytes, all zero (left zero). */
uint32_t pb_check_kernel_held(const struct fp_pool *p, const uint32_t *idxs, uint32_t n,
                              uint8_t *mark, struct pb_ret *r);

/* KernelRing.rx_enqueue: ksd[kt...] = idxs[0..take), returns the new ktail. */
uint32_t pb_rx_enqueue(uint32_t *ksd, uint32_t nslots, uint32_t kt, const uint32_t *idxs,
                       uint32_t take);
/* FP-CDEF-END */

#endif /* VDEV_NATIVE_POOLBATCH_H */
