/* Internal interfaces of the bare-metal virtio-net driver. */
#ifndef VDEV_GUEST_DRIVER_H
#define VDEV_GUEST_DRIVER_H

#include "hw.h"
#include "virtio.h"
#include "stats.h"

extern struct vdev_stats vdev_stats;
extern struct vdev_info vdev_info;

/* ---- transport (transport.c): PCI legacy, PCI modern, virtio-mmio ---- */
enum { FORCE_AUTO, FORCE_LEGACY, FORCE_MODERN, FORCE_MMIO };

int vt_probe(int force);                /* 0 when a virtio-net device was found */
const char *vt_name(void);
void vt_reset(void);
uint8_t vt_get_status(void);
void vt_set_status(uint8_t s);
uint64_t vt_device_features(void);
void vt_set_driver_features(uint64_t f);
int vt_is_modern(void);
uint16_t vt_queue_max(uint16_t q);
int vt_queue_setup(uint16_t q, uint16_t size, uintptr_t desc, uintptr_t avail, uintptr_t used);
void vt_notify(uint16_t q);
uint8_t vt_cfg8(uint32_t off);

/* ---- split virtqueue (virtq.c) ---- */
#define VQ_MAX 1024

struct vq_seg {
    uint32_t addr;
    uint32_t len;
    int write;
};

struct vq {
    uint16_t index;
    uint16_t size;
    int event_idx;
    int broken;                          /* a violation was seen: stop touching it */
    struct vring_desc *desc;
    volatile struct vring_avail_hdr *avail;
    volatile uint16_t *avail_ring;
    volatile uint16_t *used_event;       /* written by us (EVENT_IDX) */
    volatile struct vring_used_hdr *used;
    volatile struct vring_used_elem *used_ring;
    volatile uint16_t *avail_event;      /* written by the device (EVENT_IDX) */
    uint16_t avail_shadow;               /* next avail idx we will publish */
    uint16_t kick_old;                   /* avail idx at the last kick decision */
    uint16_t last_used;
    uint16_t num_free;
    uint16_t free_head;
    uint16_t in_flight;                  /* chains posted and not completed */
    uint64_t *kicks, *kicks_suppressed;
    /* Trusted per-descriptor state, never read back from shared memory. */
    uint16_t next[VQ_MAX];
    uint16_t chain_len[VQ_MAX];
    uint8_t state[VQ_MAX];
    uint32_t token[VQ_MAX];
    uint32_t wcap[VQ_MAX];               /* bytes the device may write */
    uint32_t total[VQ_MAX];              /* all bytes of the chain */
    uint16_t peek_id[VQ_MAX];            /* ids validated by vq_peek_used */
};

/* vq.state[] per descriptor: never posted, posted as a chain head, completed. */
enum { DS_FREE = 0, DS_POSTED = 1, DS_COMPLETED = 2 };
extern struct vq vdev_rxq, vdev_txq;
void vq_init(struct vq *q, uint16_t index, uint16_t size, void *mem, int event_idx);
int vq_add(struct vq *q, const struct vq_seg *segs, int n, uint32_t token);
void vq_publish(struct vq *q);
int vq_used_pending(struct vq *q);      /* entries visible, -1 on violation */
int vq_peek_used(struct vq *q, uint32_t k, uint32_t *token, uint32_t *len);
void vq_consume(struct vq *q, uint32_t n);
void vq_quiesce_events(struct vq *q);
uintptr_t vq_mem_size(uint16_t size);

/* ---- packet pool + channel, user half (channel.c) ---- */
#define POOL_PACKETS 2048
#define POOL_BUFLETS 2048
#define POOL_BUFS 4096
#define POOL_BUF_SIZE 2048
#define POOL_MAX_FRAGS 8
#define POOL_HEADROOM 16
#define RING_MAX_SLOTS 1024
#define ALLOC_RING_SLOTS 256
#define FREE_RING_SLOTS 256
#define ALLOC_WS 192                     /* packets an alloc sync keeps ready */

/* Who holds a metadata object (the trusted "upp" bookkeeping of pbufpool.c). */
enum { OWN_FREE = 0, OWN_KERNEL = 1, OWN_USER = 2 };

void pool_init(uint32_t tx_slots, uint32_t rx_slots);
struct sk_packet *pkt_md(uint32_t idx);
uint8_t *buf_addr(uint32_t buf_idx);
struct sk_buflet *buflet_at(uint32_t idx);
int pool_buf_alloc(uint32_t *buf_idx);
void pool_buf_free(uint32_t buf_idx);
int pool_buflet_alloc(uint32_t *idx);
void pool_buflet_free(uint32_t idx);
int pool_md_alloc(uint32_t *idx);       /* owner: kernel */
int pool_md_valid(uint32_t idx);        /* index in range, allocated, redzone ok */
int pool_md_owner(uint32_t idx);
void pool_md_set_owner(uint32_t idx, int owner);
int pool_packet_alloc(uint32_t *pidx, uint32_t bytes);   /* kernel side, no rings */
int pool_packet_extend(uint32_t pidx, uint32_t bytes);   /* add buflets up to bytes */
void pool_packet_free(uint32_t pidx);
void pool_update_gauges(void);

/* User half: packets come from the alloc ring and go back through the free ring. */
int sk_packet_alloc(uint32_t *pidx, uint32_t bytes);
int sk_packet_free(uint32_t pidx);
void sk_packet_finalize(uint32_t pidx);
uint8_t *sk_packet_data(uint32_t pidx);  /* first byte of buf0's data window */

extern struct sk_ring *vdev_tx_ring_p, *vdev_rx_ring_p, *vdev_alloc_ring_p, *vdev_free_ring_p;
struct sk_slot *sk_slot_at(struct sk_ring *r, uint32_t i);
uint32_t sk_slot_index(struct sk_ring *r, struct sk_slot *s);
struct sk_slot *sk_get_next_slot(struct sk_ring *r, struct sk_slot *prev);
int sk_advance_slot(struct sk_ring *r, struct sk_slot *s);
uint32_t sk_available_slot_count(struct sk_ring *r);
int sk_pending(struct sk_ring *r);
int sk_slot_attach_packet(struct sk_ring *r, struct sk_slot *s, uint32_t pidx);
uint32_t sk_slot_detach_packet(struct sk_ring *r, struct sk_slot *s);
uint32_t sk_slot_get_packet(struct sk_ring *r, struct sk_slot *s);
int sk_sync(struct sk_ring *r);          /* 0, or -1 when the device was reset */
static inline uint32_t ring_next(struct sk_ring *r, uint32_t i)
{
    return i + 1 == r->ring_num_slots ? 0 : i + 1;
}

/* ---- kernel half: rings <-> virtqueues (net.c) ---- */
struct net_opts {
    int event_idx;
    int mrg_rxbuf;
    int force;
    uint32_t qsize;
};
extern struct net_opts net_opts;
int net_init(void);                      /* probe + bring-up; 0 on success */
int net_restart(int violation);          /* reset the device and rebuild everything */
int net_ready(void);
int ksync_tx(struct sk_ring *r);
int ksync_rx(struct sk_ring *r);
uint32_t net_tx_in_flight(void);
void net_violation(uint64_t *counter, const char *name, uint32_t a, uint32_t b);

#endif
