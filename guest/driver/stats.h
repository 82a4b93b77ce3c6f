/*
 * State the bare-metal driver exports in global symbols so the host can find
 * it with pyelftools (symbol address = guest-physical address, no paging)
 * and decode it out of guest RAM with cffi.  The block between the CDEF
 * markers uses plain C types only and follows the same layout rules as
 * vdev/abi/skywalk.h: explicit padding, identical on i386 and x86_64, every
 * size a multiple of 8.
 *
 * Symbols: vdev_stats (struct vdev_stats), vdev_info (struct vdev_info),
 * vdev_pool_arena (uint32_t: guest address of the struct sk_arena_hdr),
 * vdev_tx_ring / vdev_rx_ring / vdev_alloc_ring / vdev_free_ring (uint32_t:
 * guest address of each struct sk_ring),
 * vdev_arena_mem (the arena bytes themselves).
 */
#ifndef VDEV_GUEST_STATS_H
#define VDEV_GUEST_STATS_H

/* CDEF-BEGIN */
#define VDEV_STATS_MAGIC 0x53544456      /* "VDTS" little endian */
#define VDEV_STATS_VERSION 1

/* vdev_info.transport */
#define VDEV_TRANSPORT_NONE 0
#define VDEV_TRANSPORT_PCI_LEGACY 1
#define VDEV_TRANSPORT_PCI_MODERN 2
#define VDEV_TRANSPORT_MMIO_LEGACY 3
#define VDEV_TRANSPORT_MMIO_MODERN 4

struct vdev_stats {
    uint32_t magic;
    uint32_t version;
    uint64_t tx_packets;                 /* frames handed to the TX virtqueue */
    uint64_t tx_bytes;                   /* their Ethernet bytes (no vnet header) */
    uint64_t tx_completions;             /* TX used entries accepted */
    uint64_t tx_syncs;
    uint64_t tx_kicks;                   /* notifications written */
    uint64_t tx_kicks_suppressed;        /* skipped: NO_NOTIFY or avail_event */
    uint64_t tx_bad_packets;             /* slots whose metadata failed internalize */
    uint64_t tx_ring_full;               /* syncs that stopped on a full virtqueue */
    uint64_t rx_packets;                 /* frames placed in RX slots */
    uint64_t rx_bytes;
    uint64_t rx_buffers;                 /* RX used entries accepted (merged count) */
    uint64_t rx_syncs;
    uint64_t rx_kicks;
    uint64_t rx_kicks_suppressed;
    uint64_t rx_refills;                 /* buffers posted */
    uint64_t rx_dropped;                 /* frames dropped for lack of metadata */
    uint64_t alloc_failures;
    uint64_t alloc_syncs;                /* alloc ring refills */
    uint64_t free_syncs;                 /* free ring drains */
    uint64_t free_bad;                   /* free ring slots naming a packet the user lacks */
    uint64_t resets;                     /* device resets (command or recovery) */
    uint64_t recoveries;                 /* resets caused by a device violation */
    uint64_t viol_used_id_range;
    uint64_t viol_used_id_not_outstanding;
    uint64_t viol_used_len;
    uint64_t viol_double_completion;
    uint64_t viol_used_idx_jump;
    uint64_t viol_num_buffers;
    uint64_t viol_device_needs_reset;
    uint64_t violations;                 /* sum of all viol_* */
    uint64_t pool_packets_in_use;
    uint64_t pool_buflets_in_use;
    uint64_t pool_bufs_in_use;
};

struct vdev_info {
    uint32_t magic;                      /* VDEV_STATS_MAGIC */
    uint32_t transport;                  /* VDEV_TRANSPORT_* */
    uint64_t device_features;
    uint64_t driver_features;            /* negotiated */
    uint8_t mac[6];
    uint16_t hdr_len;                    /* virtio_net_hdr bytes in front of frames */
    uint32_t rx_qsize;
    uint32_t tx_qsize;
    /* guest-physical addresses of the split rings (2.7 Split Virtqueues) */
    uint32_t rx_desc;
    uint32_t rx_avail;
    uint32_t rx_used;
    uint32_t tx_desc;
    uint32_t tx_avail;
    uint32_t tx_used;
    uint32_t pci_bdf;                    /* bus << 8 | dev << 3 | fn, or mmio base */
    uint32_t event_idx;                  /* requested on the command line */
    uint32_t mrg_rxbuf;
    uint32_t boot_ms;                    /* kmain to first prompt */
    uint32_t tsc_per_ms;
    uint32_t _pad;
};
/* CDEF-END */

typedef char vdev_stats_size_check[(sizeof(struct vdev_stats) == 272) ? 1 : -1];
typedef char vdev_info_size_check[(sizeof(struct vdev_info) == 88) ? 1 : -1];

#endif
