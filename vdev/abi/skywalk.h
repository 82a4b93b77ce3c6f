/*
 * vdev shared-memory ABI: the Skywalk-style packet pool and channel rings.
 *
 * This one file is the single definition of every layout that crosses a
 * sharing boundary.  The host reads it through cffi (vdev/abi/__init__.py
 * feeds the text between the CDEF markers to ffi.cdef), and the freestanding
 * guest driver includes it with a C compiler.  Keep the block between the
 * markers to what cffi's cdef parser accepts: plain typedefs, structs and
 * integer #defines.
 *
 * Rules that keep the layout identical for x86_64 (host) and i386 (guest):
 *  - every field is naturally aligned by explicit padding, never by the
 *    compiler (i386 aligns uint64_t to 4 inside structs);
 *  - every struct size is a multiple of 8;
 *  - objects are named by index, never by pointer.  Offsets are relative to
 *    the start of the arena.
 */
#ifndef VDEV_ABI_SKYWALK_H
#define VDEV_ABI_SKYWALK_H

#ifndef VDEV_CFFI
#ifdef VDEV_FREESTANDING
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif
#endif

/* CDEF-BEGIN */
#define SK_ABI_VERSION 1
#define SK_ARENA_MAGIC 0x41574b53        /* "SKWA" little endian */
#define SK_REDZONE_SEED 0x5eadbeefc0ffee11ULL
#define SK_NO_INDEX 0xffffffff           /* "no object" in any index field */

/* ring_kind */
#define SK_RING_TX 0
#define SK_RING_RX 1
#define SK_RING_ALLOC 2
#define SK_RING_FREE 3
#define SK_RING_EVENT 4

/* sk_slot.sd_flags */
#define SK_SD_VALID 0x0001               /* slot names a packet (sd_md_idx) */

/* sk_packet.qflags (quantum flags) */
#define SK_QUM_DROPPED 0x0001            /* user marked the packet dropped */
#define SK_QUM_FINALIZED 0x0002

/* sk_packet.pflags (packet flags) */
#define SK_PKT_VNET_HDR 0x0001           /* vnet field carries a virtio_net_hdr */
#define SK_PKT_CSUM_PARTIAL 0x0002       /* csum_start/csum_stuff are meaningful */

/* sk_buflet.flags */
#define SK_BUFLET_LARGE 0x0001           /* buf_idx names a large buffer */

/*
 * Arena header, at offset 0 of the pool's memfd.  Written once by the pool
 * owner; read-only for everyone else.
 */
struct sk_arena_hdr {
    uint32_t magic;
    uint32_t abi_version;
    uint32_t num_packets;                /* metadata objects */
    uint32_t num_buflets;                /* external buflets (beyond buf0) */
    uint32_t num_bufs;                   /* default-size buffers */
    uint32_t buf_size;
    uint32_t num_large_bufs;
    uint32_t large_buf_size;
    uint32_t max_frags;                  /* buflets per packet, buf0 included */
    uint32_t md_size;                    /* stride of struct sk_md_obj */
    uint64_t md_off;                     /* metadata region */
    uint64_t buflet_off;                 /* external buflet region */
    uint64_t buf_off;                    /* default buffer region */
    uint64_t large_buf_off;              /* large buffer region */
    uint64_t ring_off;                   /* ring region (headers + slots) */
    uint64_t ring_region_size;
    uint64_t arena_size;
};

/* A slot descriptor in a ring's slot array (the user-visible half). */
struct sk_slot {
    uint32_t sd_md_idx;                  /* packet index, valid if SK_SD_VALID */
    uint16_t sd_flags;
    uint16_t sd_len;                     /* bytes (informational, e.g. RX len) */
};

/* Buflet: one buffer with a data window [doff, doff + dlen) <= dlim. */
struct sk_buflet {
    uint32_t buf_idx;                    /* index into default or large region */
    uint32_t doff;
    uint32_t dlen;
    uint32_t dlim;
    uint32_t next_idx;                   /* next external buflet or SK_NO_INDEX */
    uint16_t flags;                      /* SK_BUFLET_* */
    uint16_t _pad;
};

/* virtio_net_hdr carried in packet metadata (virtio 1.x, 5.1.6 "Device Operation"). */
struct sk_vnet_hdr {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
    uint16_t num_buffers;
    uint32_t _pad;
};

/* Packet metadata (user-visible copy). */
struct sk_packet {
    uint32_t idx;                        /* must equal the object's own index */
    uint32_t len;                        /* total bytes = sum of buflet dlen */
    uint16_t qflags;                     /* SK_QUM_* */
    uint16_t pflags;                     /* SK_PKT_* */
    uint16_t bufs_cnt;                   /* 1..bufs_max */
    uint16_t bufs_max;                   /* == arena max_frags */
    uint16_t headroom;                   /* == buf0.doff */
    uint16_t l2_len;
    uint16_t csum_start;                 /* checksum offload: start offset */
    uint16_t csum_stuff;                 /* checksum offload: where to store */
    struct sk_vnet_hdr vnet;
    struct sk_buflet buf0;               /* first buflet lives inline */
};

/* Preamble in front of every metadata object; its redzone detects overwrites. */
struct sk_md_preamble {
    uint64_t redzone;                    /* SK_REDZONE_SEED ^ object index */
};

struct sk_md_obj {
    struct sk_md_preamble pre;
    struct sk_packet pkt;
};

/*
 * User ring header.  The user side owns ring_head; the kernel side owns
 * ring_tail and ring_khead and publishes them on sync finalize.  Slot i of
 * the ring is at arena + slots_off + i * sizeof(struct sk_slot).
 */
struct sk_ring {
    uint32_t ring_head;                  /* user: next slot to hand over */
    uint32_t ring_tail;                  /* kernel: first slot not owned by user */
    uint32_t ring_khead;                 /* kernel: next slot the kernel consumes */
    uint32_t ring_num_slots;
    uint32_t ring_kind;                  /* SK_RING_* */
    uint32_t ring_id;
    uint32_t buf_size;
    uint32_t large_buf_size;
    uint32_t max_frags;
    uint32_t alloc_ws;                   /* alloc ring working set hint */
    uint64_t md_off;                     /* copies of the arena offsets, so a */
    uint64_t buflet_off;                 /* ring alone is enough to find data */
    uint64_t buf_off;
    uint64_t large_buf_off;
    uint64_t slots_off;
    uint32_t md_size;
    uint32_t ready_slots;                /* kernel: slots ready for the user */
    uint64_t ready_bytes;                /* kernel: bytes in those slots */
};
/* CDEF-END */

#ifndef VDEV_CFFI
#define SK_ASSERT_SIZE(t, n) typedef char sk_size_check_##t[(sizeof(struct t) == (n)) ? 1 : -1]
SK_ASSERT_SIZE(sk_arena_hdr, 96);
SK_ASSERT_SIZE(sk_slot, 8);
SK_ASSERT_SIZE(sk_buflet, 24);
SK_ASSERT_SIZE(sk_vnet_hdr, 16);
SK_ASSERT_SIZE(sk_packet, 64);
SK_ASSERT_SIZE(sk_md_obj, 72);
SK_ASSERT_SIZE(sk_ring, 96);
#endif

#endif /* VDEV_ABI_SKYWALK_H */
