/*
 * One echo turn in one call (vqecho.c): a TX burst, the switch, the responder, the switch
 * again and the RX burst, for a NIC talking to the device's built-in responder, with the
 * two interrupts written from C.  It exists for latency (issue 11: the Python glue between
 * the five compiled stages cost 50-60 us of a round trip); vdev/net/echoturn.py decides
 * when it may run and books what it did exactly as the stage-by-stage path would have.
 *
 * The block between the FP-CDEF markers is handed verbatim to cffi's cdef by
 * vdev/native/build.py, so keep it to plain typedef-free declarations.
 */
#ifndef VDEV_NATIVE_VQECHO_H
#define VDEV_NATIVE_VQECHO_H

#include <stdint.h>

#include "virtq.h"
#include "switch.h"

/* FP-CDEF-BEGIN */
/* Where a turn stopped (ve_turn.stage): every stage before it ran plainly; the stage named
 * ran and its outcome needs the general path, which takes over from there. */
#define VE_TX 1        /* the TX burst ran (stop not EMPTY/BUDGET, or no packets) */
#define VE_FWD 2       /* the NIC's packets were switched, not all to the responder */
#define VE_RESP 3      /* the responder stopped at a packet it cannot judge in C */
#define VE_FWD2 4      /* the replies were switched, not all back to the NIC */
#define VE_RX 5        /* the RX burst did not write every reply plainly (not finished) */
#define VE_DONE 6      /* every stage plain, both queues finished and signalled */

struct ve_turn {
    /* TX */
    struct vq_queue *txq;
    struct vq_pool *vp;
    uint32_t hlen;
    uint32_t budget;
    uint32_t *tx_out;
    struct vq_burst *txb;
    int32_t tx_fd;                /* the TX call eventfd, -1 for none */
    /* the switch (the switch's own scratch arrays, as Switch.forward uses them) */
    const struct fp_pool *p;
    const struct sw_bufs *sb;
    struct sw_fdb *fdb;
    int32_t nic_id;
    int32_t resp_id;
    int32_t *dest;
    uint32_t *lens;
    uint32_t *learned;
    uint32_t *order;
    int32_t *groups;
    struct sw_ret *sr;
    uint8_t *macs;                /* the first forward's learned source MACs, 6 bytes each */
    /* the responder */
    uint64_t mac;
    uint32_t ip;
    const uint16_t *ports;
    uint32_t n_sink;
    uint32_t n_echo;
    uint8_t *verdict;
    struct sw_resp *rr;
    uint32_t *replies;            /* the packets that hold replies, in order */
    /* RX */
    struct vq_queue *rxq;
    uint8_t *bufs;
    uint8_t *large;
    uint32_t rx_flags;
    uint32_t rx_max;              /* at most this many replies go through the RX burst */
    struct vq_burst *rxb;
    int32_t rx_fd;
    /* results */
    uint32_t stage;               /* VE_* */
    uint32_t tx_notify;           /* vq_finish said to signal TX (written to tx_fd) */
    uint32_t rx_notify;
    uint32_t n_replies;
    int32_t tx_errno;             /* the eventfd write's errno, 0 when it worked */
    int32_t rx_errno;
    uint32_t n_learned1;          /* the first forward's learned entries (macs[]) */
    uint64_t nbytes1;             /* the first forward's byte count (sr holds the last's) */
};

/* Run one turn; returns t->stage. */
uint32_t ve_run(struct ve_turn *t);
/* Busy-wait up to spin_ns for TX queue q to have a chain available (without touching
 * it): 1 when one is, 0 at the end of the wait. */
uint32_t ve_tx_wait(const struct vq_queue *q, uint64_t spin_ns);
/* FP-CDEF-END */

#endif /* VDEV_NATIVE_VQECHO_H */
