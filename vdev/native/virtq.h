/*
 * Compiled virtqueue bursts (virtq.c): the per-chain work of vdev/net/nic.py's TX loop and
 * RX drain on a split (virtio 1.x 2.7) or packed (2.8) ring, behind vdev/virtio/fastqueue.py.
 *
 * The block between the FP-CDEF markers is handed verbatim to cffi's cdef by
 * vdev/native/build.py, so keep it to plain typedef-free declarations.
 */
#ifndef VDEV_NATIVE_VIRTQ_H
#define VDEV_NATIVE_VIRTQ_H

#include <stdint.h>

#include "fastpath.h"

/* FP-CDEF-BEGIN */
/* Why a burst stopped (vq_burst.stop). */
#define VQ_STOP_EMPTY 1        /* TX: ring empty after re-arming the kick; RX: backlog done */
#define VQ_STOP_BUDGET 2       /* TX: the chain budget is used up */
#define VQ_STOP_SLOW 3         /* the next item needs the Python reference (drop, pool, ...) */
#define VQ_STOP_VIOLATION 4    /* the next item breaks a ring rule: Python kills with detail */
#define VQ_STOP_NOROOM 5       /* RX: the guest posted too few buffers, kick re-armed */
#define VQ_STOP_GUEST_FAULT 6  /* reserved for the guest-memory guard (memguard): a SIGBUS;
                                * the state struct holds every item committed before it,
                                * fastqueue.py frees partial_pkt and kills the queue */
#define VQ_STOP_BADARGS 7      /* trusted arguments inconsistent: use the Python path */

/* vq_rx flags: the negotiated features the RX write depends on. */
#define VQ_RX_MERGEABLE 1      /* VIRTIO_NET_F_MRG_RXBUF */
#define VQ_RX_GUEST_CSUM 2     /* VIRTIO_NET_F_GUEST_CSUM: NEEDS_CSUM frames pass as they are */

/* Why the next item needs Python (vq_burst.slow). */
#define VQS_RUNT 1
#define VQS_OVERSIZE 2
#define VQS_POOL 3             /* pool exhausted, too big for it, or spare lists too short */
#define VQS_GSO 4
#define VQS_RX_CSUM 5
#define VQS_RX_SMALL 6
#define VQS_SEGS 7             /* more segments than the scratch array holds */

/* The ring rule the next item breaks (vq_burst.violation): fastqueue.VIOLATIONS maps each
 * to the KillReason and the phrase of the Python reference's detail. */
#define VQV_HEAD_OOB 1
#define VQV_HEAD_RANGE 2
#define VQV_HEAD_INFLIGHT 3
#define VQV_LOOP 4
#define VQV_TOO_LONG 5
#define VQV_NESTED 6
#define VQV_INDIRECT_FEATURE 7
#define VQV_INDIRECT_NEXT 8
#define VQV_INDIRECT_LEN 9
#define VQV_INDIRECT_MAX 10
#define VQV_INDIRECT_MEM 11
#define VQV_WRITABLE 12
#define VQV_READABLE 13
#define VQV_ORDER 14
#define VQV_BUF_MEM 15
#define VQV_NEXT_RANGE 16
#define VQV_OVERFLOW 17
/* packed rings (2.8) */
#define VQV_NOT_AVAIL 18
#define VQV_CHAIN_LONG 19
#define VQV_INDIRECT_AFTER_DIRECT 20
#define VQV_INDIRECT_TOO_LONG 21
#define VQV_TABLE_NESTED 22
#define VQV_BUF_ID 23
#define VQV_ID_INFLIGHT 24

/* One guest memory region: guest-physical start, size and where it is mapped here. */
struct vq_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
};

/* A device-readable or -writable buffer of a chain, translated. */
struct vq_seg {
    uint8_t *p;
    uint32_t len;
};

/*
 * One queue as a burst sees it, split (2.7) or packed (2.8): trusted ring pointers and
 * device-private state copied in from SplitQueue / PackedQueue and back out after the call
 * (fastqueue.py), the guest memory map and scratch space.  Statistics are the queue's
 * VirtqueueStats, carried through.
 */
struct vq_queue {
    uint32_t packed;              /* 0: split ring, 1: packed ring */
    uint8_t *desc;                /* descriptor table / packed descriptor ring (size entries) */
    /* split: avail ring as u16: [0] flags [1] idx [2+i] ring [2+size] used_event;
     * packed: driver event suppression area, [0] off_wrap [1] flags */
    uint16_t *avail;
    /* split: used ring as u16: [0] flags [1] idx, elements, [2+4*size] avail_event;
     * packed: device event suppression area, [0] off_wrap [1] flags */
    uint16_t *used16;
    uint32_t size;
    uint32_t indirect_ok;
    uint32_t event_idx;
    uint32_t notify_on_empty;
    uint32_t allow_readable;
    uint32_t allow_writable;
    uint32_t hold_kick;           /* 1: a drained TX ring is not re-armed (kick mitigation) */
    uint32_t kick_ahead;          /* RX: ask for the refill kick after this many buffers */
    uint32_t rx_waiting;          /* RX: frames waiting when the burst started (the caller's) */
    uint32_t last_avail;          /* split: last avail idx; packed: avail index */
    uint32_t seen_avail;          /* split only */
    uint32_t used_idx;            /* split: used idx; packed: used index */
    uint32_t pending_used;        /* split only: pushed, unpublished */
    uint32_t signalled_used;      /* split: used idx at the last decision; packed: ring position */
    uint32_t signalled_valid;
    uint32_t avail_wrap, used_wrap;         /* packed wrap counters */
    int64_t scan_end;             /* packed avail_count cache: ring position, -1 for None */
    uint32_t scan_chains;
    uint64_t *inflight;           /* write_len + 1 per head / buffer id in flight, 0 when not */
    uint16_t *popped;             /* split: head popped from each avail slot (for rewind) */
    uint16_t *ndesc;              /* packed: descriptors each buffer id in flight used */
    uint32_t *pend_id, *pend_len, *pend_nd;  /* packed: pushed, unpublished (id, len, descs) */
    uint32_t npend, pend_cap;
    uint64_t chains, descriptors, bytes_read, bytes_written, used, flushes;
    uint64_t notifications_sent, notifications_suppressed;
    const struct vq_region *regions;
    uint32_t nregions;
    struct vq_seg *segs;          /* scratch for the buffers of the chains of one item */
    uint32_t seg_cap;
    uint8_t *scratch;             /* scratch for one frame (checksum completion, RX data) */
    uint32_t scratch_cap;
};

/* One of a pool's free lists (vdev/skywalk/freelist.py): a stack v[0..n), top last, of at
 * most cap entries.  The Python pool code pushes and pops the same memory. */
struct fl_stack {
    uint32_t *v;
    uint32_t n;
    uint32_t cap;
};

/* The pool side of a burst: fastpath.h's trusted arrays plus the data buffers and the top
 * of each free list (the last entry is popped first, as the pool's pop()). */
struct vq_pool {
    const struct fp_pool *p;
    uint8_t *bufs;                /* arena + buf_off */
    uint8_t *large;               /* arena + large_buf_off */
    uint32_t num_large;           /* configured large buffers (0: none) */
    /* What the burst may pop: the top n_pkts entries of free_pkts (free_pkts_len: the
     * list's real length, for the reference's "pool exhausted" decisions); likewise for
     * external buflets and large buffers.  vq_tx sets them to the whole lists (popped in
     * place) unless vq_pool_reserve made them this struct's own copies of the tops. */
    uint32_t *free_pkts;
    uint32_t n_pkts, free_pkts_len;
    uint32_t *free_ext;
    uint32_t n_ext, free_ext_len;
    uint32_t *free_large;
    uint32_t n_large, free_large_len;
    struct fl_stack *lists[3];    /* the pool's lists: packets, external buflets, large */
    uint32_t *own[3];             /* arrays for reserved tops (own_cap[i] entries each) */
    uint32_t own_cap[3];
    uint32_t took[3];             /* entries the burst was given of each list */
    uint32_t reserved;            /* 1 from vq_pool_reserve to vq_pool_unreserve */
};

struct vq_burst {
    uint32_t stop;                /* VQ_STOP_* */
    uint32_t slow;                /* VQS_* for VQ_STOP_SLOW */
    uint32_t violation;           /* VQV_* for VQ_STOP_VIOLATION */
    uint32_t count;               /* TX: chains consumed; RX: packets written */
    uint32_t npkts;               /* TX: packets written to out[] */
    uint32_t merged;              /* RX: frames spanning more than one buffer */
    uint64_t nbytes;              /* frame bytes (without the vnet header) */
    /* TX: the packet being filled while guest memory is read (UINT32_MAX when none): after
     * VQ_STOP_GUEST_FAULT it is allocated but not in out[], and the glue frees it. */
    uint32_t partial_pkt;
};

/* TX: consume up to budget chains (nic._process_tx_batch's loop). */
uint32_t vq_tx(struct vq_queue *q, struct vq_pool *vp, uint32_t hlen, uint32_t budget,
                     uint32_t *out, struct vq_burst *b);
/* RX: write packets pkts[0..n) into guest buffers (nic.drain_rx's loop, one queue). */
uint32_t vq_rx(struct vq_queue *q, const struct fp_pool *p, uint8_t *bufs, uint8_t *large,
                     uint32_t hlen, uint32_t flags, const uint32_t *pkts, uint32_t n,
                     struct vq_burst *b);
/* For a burst that runs without the pool's lock (a datapath thread, GIL released): move
 * up to k[i] tops of each list into own[i] (called with the lock held); unreserve pushes
 * back what the burst left, in order (lock held again).  Returns 0, or 1 on bad arguments. */
uint32_t vq_pool_reserve(struct vq_pool *vp, uint32_t kp, uint32_t ke, uint32_t kl);
uint32_t vq_pool_unreserve(struct vq_pool *vp);
/* flush_used then should_notify: returns 1 to signal the call eventfd. */
uint32_t vq_finish(struct vq_queue *q, uint32_t consumed);
/* FP-CDEF-END */

#endif /* VDEV_NATIVE_VIRTQ_H */
