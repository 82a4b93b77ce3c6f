/*
 * Compiled bursts of the user half of a Skywalk channel (vdev/skywalk/channel.py's send and
 * recv loops; glue in vdev/skywalk/chanbatch.py).
 *
 * The user half sees only the shared arena, so these functions take the arena's base and
 * size plus the geometry the Python Channel already validated (struct cb_arena), and range-
 * check every index they read back from shared memory before using it, as channel.py does:
 * a corrupted arena gives an error code, never an out-of-bounds access.
 */
#ifndef VDEV_NATIVE_CHANBATCH_H
#define VDEV_NATIVE_CHANBATCH_H

#include <stdint.h>

/* FP-CDEF-BEGIN */
/* Stop reasons (cb_ret.code). */
#define CB_OK 0              /* everything asked for was done */
#define CB_TX_FULL 1         /* send: TX ring has no room (sync TX) */
#define CB_ALLOC_EMPTY 2     /* send: ALLOC ring empty (sync ALLOC) */
#define CB_FREE_FULL 3       /* recv: FREE ring has no room (sync FREE) */
#define CB_OUT_FULL 4        /* recv: the output buffer cannot hold the next frame */
#define CB_TOO_BIG 5         /* send: frame does not fit the packet (v[0]=pkt, v[1]=capacity) */
#define CB_BAD_INDEX 6       /* an index read from the arena is out of range (v[0]=what, v[1]=value) */

/* CB_BAD_INDEX what (cb_ret.v[0]) */
#define CB_BAD_PACKET 1
#define CB_BAD_BUFLET 2
#define CB_BAD_BUFFER 3
#define CB_BAD_WINDOW 4

struct cb_arena {
    uint8_t *base;
    uint64_t size;
    uint64_t md_off;
    uint64_t buflet_off;
    uint64_t buf_off;
    uint64_t large_buf_off;
    uint64_t ring_off;
    uint32_t num_packets;
    uint32_t num_buflets;
    uint32_t num_bufs;
    uint32_t buf_size;
    uint32_t num_large_bufs;
    uint32_t large_buf_size;
};

/* One user ring: its header's arena offset, slot array offset and slot count (checked by
 * channel.UserRing against the arena before any call). */
struct cb_ring {
    uint64_t off;
    uint64_t slots_off;
    uint32_t n;
};

struct cb_ret {
    uint32_t code;           /* CB_* */
    uint32_t count;          /* frames sent / received */
    uint64_t nbytes;
    uint64_t v[2];
    uint32_t pkt;            /* the packet being worked on when a CB_TOO_BIG / CB_BAD_INDEX stopped */
    uint32_t _pad;
};

/* Stage frames i = 0..count-1 (bytes data[offs[i] .. offs[i] + lens[i])) on the TX ring:
 * take a packet from the ALLOC ring, write the frame across its buflets (no headroom, no vnet
 * header), attach it to the next TX slot.  Moves both rings' heads; no sync. */
uint32_t cb_send(const struct cb_arena *a, const struct cb_ring *tx, const struct cb_ring *alloc,
                 const uint8_t *data, const uint32_t *offs, const uint32_t *lens, uint32_t count,
                 struct cb_ret *r);

/* Take up to max frames off the RX ring: copy each (when out is not NULL) to
 * out[r.nbytes ...] with its length in lens[i], detach it and hand the packet back on the
 * FREE ring.  Moves both rings' heads; no sync. */
uint32_t cb_recv(const struct cb_arena *a, const struct cb_ring *rx, const struct cb_ring *fr,
                 uint32_t max, uint8_t *out, uint64_t out_cap, uint32_t *lens, struct cb_ret *r);
/* FP-CDEF-END */

#endif /* VDEV_NATIVE_CHANBATCH_H */
