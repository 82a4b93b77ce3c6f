/*
 * Compiled per-slot loops of vdev/skywalk/slotwork.py (see fastpath.c).
 *
 * The block between the FP-CDEF markers is handed verbatim to cffi's cdef by
 * vdev/native/build.py, so keep it to plain typedef-free declarations.
 */
#ifndef VDEV_SKYWALK_FASTPATH_H
#define VDEV_SKYWALK_FASTPATH_H

#include <stdint.h>

/* FP-CDEF-BEGIN */
/* Failure / result codes (fp_ret.code). */
#define FP_OK 0
#define FP_BADARGS 1              /* trusted arguments out of range: use the Python path */
#define FP_UNALLOCATED 2          /* slot names a packet the owner does not hold */
#define FP_QUM_IDX 3              /* metadata idx does not name itself */
#define FP_INTERNALIZE 4          /* internalize failed: fp_ret.detail says which check */
#define FP_NOT_DETACHED 5         /* released RX/EVENT slot still SD_VALID */
#define FP_READY_BYTES 6          /* released slot's sd_len differs from the published one */
#define FP_POOL_ERROR 7           /* rx_publish: queued packet not held by the kernel */
#define FP_INDEX_ERROR 8          /* rx_publish: trusted ksd entry out of range */
#define FP_OVERFLOW 9             /* externalize: headroom does not fit 16 bits */

/* Internalize checks (fp_ret.detail), in the order slotwork.internalize runs them; each
 * FPD_<name> is slotwork.INTERNALIZE_CHECKS["<name>"] (fastglue maps them by name). */
#define FPD_REDZONE 1
#define FPD_BUFS_MAX 2
#define FPD_BUFS_CNT_RANGE 3
#define FPD_BUFS_CNT_CHAIN 4      /* BAD_BUFLET_CHAIN */
#define FPD_BUF_IDX 5
#define FPD_LARGE_FLAG 6
#define FPD_DLIM 7
#define FPD_DOFF_DLEN 8
#define FPD_NEXT 9                /* BAD_BUFLET_CHAIN */
#define FPD_LEN_SUM 10
#define FPD_HEADROOM 11
#define FPD_L2_LEN 12
#define FPD_PFLAGS 13
#define FPD_CSUM 14
#define FPD_VNET_CSUM 15

/*
 * The ring functions take one ring's slot array as (ring, ring_bytes, slots_w32, n): the
 * ring region of the arena, its size, the slot array's offset in 32-bit words and the
 * number of slots.  All four are trusted and are checked against each other anyway.
 */

/* Kernel-trusted pool state (Python arrays) and the arena regions it guards. */
struct fp_pool {
    uint8_t *md;                  /* arena + md_off: struct sk_md_obj[num_packets] */
    uint8_t *bl;                  /* arena + buflet_off: struct sk_buflet[num_ext] */
    uint32_t num_packets;
    uint32_t num_ext;
    uint32_t max_frags;
    uint32_t buf_size;
    uint32_t large_buf_size;
    uint32_t *b_buf;
    uint8_t *b_large;
    uint32_t *b_doff;
    uint32_t *b_dlen;
    uint32_t *b_next;
    uint8_t *pkt_state;
    int32_t *pkt_owner;
    uint32_t *pkt_len;
    uint16_t *pkt_nbufs;
    uint16_t *pkt_pflags;
    uint16_t *pkt_l2;
    uint16_t *pkt_cstart;
    uint16_t *pkt_cstuff;
    uint8_t *pkt_vnet;
};

struct fp_ret {
    uint32_t code;                /* FP_* */
    uint32_t detail;              /* FPD_* for FP_INTERNALIZE */
    uint32_t slot;                /* failing slot */
    uint32_t count;               /* packets written to out[] (taken / published) */
    uint64_t nbytes;
    uint64_t v[5];                /* numbers for the detail message */
};

uint32_t fp_internalize(const struct fp_pool *p, uint32_t idx, struct fp_ret *r);
uint32_t fp_externalize(const struct fp_pool *p, uint32_t idx, struct fp_ret *r);
uint32_t fp_tx_take(const struct fp_pool *p, int32_t owner, uint8_t *ring, uint64_t ring_bytes, uint64_t slots_w32, uint32_t n,
                    uint32_t start, uint32_t end, uint32_t *out, struct fp_ret *r);
uint32_t fp_free_take(const struct fp_pool *p, int32_t owner, uint8_t *ring, uint64_t ring_bytes, uint64_t slots_w32, uint32_t n,
                      uint32_t start, uint32_t end, uint32_t *out, struct fp_ret *r);
uint32_t fp_rx_release_check(uint8_t *ring, uint64_t ring_bytes, uint64_t slots_w32, uint32_t n,
                             uint32_t start, uint32_t end,
                             const uint32_t *klen, struct fp_ret *r);
uint32_t fp_rx_publish(const struct fp_pool *p, int32_t owner, uint8_t *ring, uint64_t ring_bytes, uint64_t slots_w32, uint32_t n,
                       uint32_t start, uint32_t end, uint32_t *ksd, uint32_t *klen,
                       uint32_t *out, struct fp_ret *r);
/* FP-CDEF-END */

#endif /* VDEV_SKYWALK_FASTPATH_H */
