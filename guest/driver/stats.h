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
 * vdev_arena_mem (the arena bytes themselves), vdev_vqs (struct vdev_vq_info
 * [VDEV_MAX_VQS]: one entry per virtqueue the driver set up, in virtqueue
 * index order with the control queue last; entries with size 0 are unused),
 * vdev_ticks and vdev_halts (uint64_t: timer interrupts and hlt instructions
 * so far; kept out of vdev_stats because they move while the driver idles).
 */
#ifndef VDEV_GUEST_STATS_H
#define VDEV_GUEST_STATS_H

/* CDEF-BEGIN */
#define VDEV_STATS_MAGIC 0x53544456      /* "VDTS" little endian */
#define VDEV_STATS_VERSION 2

/* vdev_info.transport */
#define VDEV_TRANSPORT_NONE 0
#define VDEV_TRANSPORT_PCI_LEGACY 1
#define VDEV_TRANSPORT_PCI_MODERN 2
#define VDEV_TRANSPORT_MMIO_LEGACY 3
#define VDEV_TRANSPORT_MMIO_MODERN 4

/* vdev_info.irq_mode */
#define VDEV_IRQ_POLL 0                  /* interrupts off: the driver busy-polls */
#define VDEV_IRQ_INTX_PIC 1              /* INTx through the 8259 PIC */
#define VDEV_IRQ_INTX_IOAPIC 2           /* INTx (or virtio-mmio's line) through an IOAPIC */
#define VDEV_IRQ_MSIX 3                  /* MSI-X vectors to the local APIC */

/* vdev_vq_info.flags */
#define VDEV_VQF_ACTIVE 1                /* set up and in use */
#define VDEV_VQF_PACKED 2                /* 2.8 Packed Virtqueues (else 2.7 split) */
#define VDEV_VQF_EVENT_IDX 4
#define VDEV_VQF_INDIRECT 8              /* chains go through indirect tables */
#define VDEV_VQF_ARMED 16                /* used-buffer notifications enabled right now */
#define VDEV_VQF_BROKEN 32               /* a device violation was seen */
#define VDEV_VQF_CTRL 64                 /* the control virtqueue */

#define VDEV_MAX_PAIRS 8
#define VDEV_MAX_VQS 17                  /* 8 RX/TX pairs and the control queue */

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
    /* interrupts (all zero with irq=0) */
    uint64_t irq_total;                  /* NIC interrupts taken, any kind */
    uint64_t irq_queue;                  /* used-buffer notifications (ISR bit 0 / queue vector) */
    uint64_t irq_config;                 /* configuration-change notifications */
    uint64_t irq_spurious;               /* a queue notification with no new work anywhere */
    uint64_t irq_unarmed;                /* new work on a queue whose notifications were off */
    uint64_t irq_isr_zero;               /* INTx whose ISR status read 0 */
    uint64_t irq_lost;                   /* watchdog: work waited past irq_wd ms unsignalled */
    uint64_t rx_irqs;                    /* notifications attributed to RX queues */
    uint64_t tx_irqs;                    /* ... to TX queues */
    uint64_t link_changes;               /* link status changes seen through config interrupts */
    uint64_t link_up;                    /* gauge: 1 while VIRTIO_NET_S_LINK_UP */
    /* control queue, offloads */
    uint64_t ctrl_cmds;
    uint64_t ctrl_errors;
    uint64_t tx_csum_offload;            /* frames sent with NEEDS_CSUM for the device */
    uint64_t tx_csum_sw;                 /* checksums the driver completed (CSUM not negotiated) */
    uint64_t tx_gso;                     /* frames sent with a gso_type (TSO) */
    uint64_t tx_gso_refused;             /* GSO frames dropped: HOST_TSO not negotiated */
    uint64_t tx_indirect;                /* chains posted through an indirect table */
    uint64_t rx_csum_partial;            /* RX frames with NEEDS_CSUM (GUEST_CSUM) */
    uint64_t rx_csum_valid;              /* RX frames with DATA_VALID */
    uint64_t rx_gso;                     /* RX frames with a gso_type (GUEST_TSO) */
};

/* One virtqueue as the driver runs it (exported array vdev_vqs). */
struct vdev_vq_info {
    uint32_t index;                      /* virtqueue index (2n RX, 2n+1 TX, 2N control) */
    uint32_t size;                       /* 0: entry unused */
    uint32_t flags;                      /* VDEV_VQF_* */
    uint32_t msix_vector;                /* 0xffff: none */
    uint32_t desc;                       /* guest-physical ring areas: descriptor table, */
    uint32_t driver;                     /* avail ring / driver event suppression, */
    uint32_t device;                     /* used ring / device event suppression */
    uint32_t avail_idx;                  /* split: next avail idx; packed: next slot | wrap << 15 */
    uint32_t last_used;                  /* split: used idx consumed; packed: slot | wrap << 15 */
    uint32_t in_flight;                  /* buffers posted and not yet used */
    uint32_t num_free;                   /* free descriptors (ring slots) */
    uint32_t _pad;
    uint64_t posted;                     /* buffers made available */
    uint64_t completed;                  /* used buffers accepted */
    uint64_t kicks;
    uint64_t kicks_suppressed;
    uint64_t irqs;                       /* notifications attributed to this queue */
    uint64_t irq_lost;
    uint64_t packets;                    /* frames that went through this queue */
    uint64_t bytes;
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
    uint32_t irq_mode;                   /* VDEV_IRQ_* in effect */
    uint32_t irq_line;                   /* INTx: PIC IRQ or IOAPIC GSI; MSI-X: vectors used */
    uint32_t irq_wd_ms;                  /* lost-interrupt watchdog bound */
    uint32_t max_pairs;                  /* the device's max_virtqueue_pairs (1 without MQ) */
    uint32_t pairs;                      /* queue pairs in use */
    uint32_t packed;                     /* 1: packed rings negotiated */
    uint32_t indirect;                   /* 1: TX chains through indirect descriptors */
    uint32_t csum;                       /* 1: VIRTIO_NET_F_CSUM (+ GUEST_CSUM) negotiated */
    uint32_t tso;                        /* 1: HOST_TSO4/6 (+ GUEST_TSO4/6) negotiated */
};
/* CDEF-END */

typedef char vdev_stats_size_check[(sizeof(struct vdev_stats) == 440) ? 1 : -1];
typedef char vdev_info_size_check[(sizeof(struct vdev_info) == 120) ? 1 : -1];
typedef char vdev_vq_info_size_check[(sizeof(struct vdev_vq_info) == 112) ? 1 : -1];

#endif
