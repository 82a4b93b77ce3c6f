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
int vt_is_pci(void);
uint16_t vt_queue_max(uint16_t q);
int vt_queue_setup(uint16_t q, uint16_t size, uintptr_t desc, uintptr_t avail, uintptr_t used);
void vt_notify(uint16_t q);
uint8_t vt_cfg8(uint32_t off);
uint16_t vt_cfg16(uint32_t off);
/* Interrupts: INTx status (read-to-ack: 4.1.4.5 ISR status, 4.2.2 InterruptStatus /
 * InterruptACK), the INTx line, and MSI-X (4.1.4.3 / 4.1.4.8 vectors). */
uint8_t vt_read_isr(void);
int vt_intx_line(uint32_t *line, int *gsi); /* PCI: Interrupt Line; mmio: its IOAPIC pin */
uint32_t vt_mmio_index(void);
int vt_msix_enable(uint32_t want, uint8_t first_vector); /* vectors enabled, 0: none */
void vt_msix_disable(void);
int vt_msix_on(void);
uint16_t vt_set_config_vector(uint16_t v);  /* read back: VIRTIO_MSI_NO_VECTOR if refused */
uint16_t vt_set_queue_vector(uint16_t q, uint16_t v);

/* ---- interrupt controllers and the wait primitive (irq.c) ---- */
#define VEC_PIC_BASE 0x20                /* 8259: IRQ n -> vector 0x20 + n */
#define VEC_NIC_APIC 0x30                /* INTx / virtio-mmio line through an IOAPIC */
#define VEC_MSIX_BASE 0x31               /* MSI-X entry n -> vector 0x31 + n (config is 0) */
#define VEC_MSIX_MAX 15                  /* entries 0..14: config + 14 queues */
#define VEC_SPURIOUS 0xff
#define IRQ_TIMER_HZ 500

struct irq_opts {
    int on;                              /* irq=0|1 */
    int msix;                            /* msix=0|1: try MSI-X (PCI only) */
    int ioapic;                          /* intx=ioapic: route INTx through the IOAPIC */
    uint32_t wd_ms;                      /* irq_wd=MS: lost-interrupt bound */
    int mmio_irq;                        /* virtio_mmio.device=...:N or mmio_irq=N; -1 auto */
};
extern struct irq_opts irq_opts;
extern uint64_t vdev_ticks, vdev_halts;

void irq_init(void);                     /* IDT, PIC remap (all masked); once at boot */
int irq_route_nic(void);                 /* program the controller for the NIC's line(s) */
void irq_unroute_nic(void);
int irq_enabled(void);                   /* interrupts are on (irq=1 and routed) */
void irq_idle(void);                     /* sleep until any interrupt (or relax when polling) */

/* ---- virtqueues (virtq.c): 2.7 split and 2.8 packed, driver side ---- */
#define VQ_MAX 1024
#define IND_MAX 8                        /* descriptors per indirect table (POOL_MAX_FRAGS) */
#define PEEK_MAX 8                       /* used entries validated ahead (packed) */

struct vq_seg {
    uint32_t addr;
    uint32_t len;
    int write;
};

struct vq {
    uint16_t index;
    uint16_t size;
    int event_idx;
    int packed;
    int broken;                          /* a violation was seen: stop touching it */
    volatile int armed;                  /* used-buffer notifications enabled */
    volatile int irq_pending;            /* set by the ISR, cleared by the waiter */
    struct vdev_vq_info *info;           /* exported indices and counters */
    uint64_t *kicks, *kicks_suppressed;  /* aggregate counters (vdev_stats) */
    uint64_t *irqs;
    /* split ring (2.7) */
    struct vring_desc *desc;
    volatile struct vring_avail_hdr *avail;
    volatile uint16_t *avail_ring;
    volatile uint16_t *used_event;       /* written by us (EVENT_IDX) */
    volatile struct vring_used_hdr *used;
    volatile struct vring_used_elem *used_ring;
    volatile uint16_t *avail_event;      /* written by the device (EVENT_IDX) */
    /* packed ring (2.8) */
    volatile struct vring_packed_desc *pdesc;
    volatile struct vring_packed_desc_event *drv_event;  /* ours: when to interrupt us */
    volatile struct vring_packed_desc_event *dev_event;  /* the device's: when to kick */
    uint16_t avail_pos, used_pos;        /* next slot to fill / to look at */
    uint8_t avail_wrap, used_wrap;       /* 2.8.1 wrap counters, start at 1 */
    uint16_t num_added;                  /* slots made available since the last kick decision */
    uint16_t pk_n;                       /* validated used buffers cached in pk_id/pk_len */
    uint16_t pk_pos;                     /* slot after the last cached one */
    uint8_t pk_wrap;
    uint32_t used_lin;                   /* packed: slots consumed since init */
    /* common */
    uint16_t avail_shadow;               /* split: next avail idx we will publish */
    uint16_t kick_old;                   /* split: avail idx at the last kick decision */
    uint16_t last_used;                  /* split: used idx consumed */
    uint16_t num_free;                   /* free descriptors / ring slots */
    uint16_t free_head;                  /* free list of descriptors (split) or ids (packed) */
    uint16_t in_flight;                  /* buffers posted and not completed */
    uint32_t irq_seen;                   /* device progress at the last attribution */
    uint64_t wd_since;                   /* TSC when unsignalled work was first seen */
    struct vring_desc *ind;              /* indirect tables (IND_MAX per id), or NULL */
    /* Trusted per-descriptor (split) or per-id (packed) state, never read back from
     * shared memory. */
    uint16_t next[VQ_MAX];
    uint16_t chain_len[VQ_MAX];
    uint8_t state[VQ_MAX];
    uint32_t token[VQ_MAX];
    uint32_t wcap[VQ_MAX];               /* bytes the device may write */
    uint32_t total[VQ_MAX];              /* all bytes of the chain */
    uint16_t peek_id[VQ_MAX];            /* ids validated by vq_peek_used / the packed walk */
    uint32_t pk_len[PEEK_MAX];
};

/* vq.state[] per descriptor: never posted, posted as a chain head, completed. */
enum { DS_FREE = 0, DS_POSTED = 1, DS_COMPLETED = 2 };
void vq_init(struct vq *q, uint16_t index, uint16_t size, void *mem, int event_idx, int packed,
             struct vring_desc *indirect_tables);
int vq_add(struct vq *q, const struct vq_seg *segs, int n, uint32_t token);
void vq_publish(struct vq *q);
int vq_used_pending(struct vq *q);      /* entries visible, -1 on violation */
int vq_peek_used(struct vq *q, uint32_t k, uint32_t *token, uint32_t *len);
void vq_consume(struct vq *q, uint32_t n);
void vq_quiesce_events(struct vq *q);   /* = vq_disarm */
int vq_arm(struct vq *q);               /* notifications on; 1 if work is already there */
void vq_disarm(struct vq *q);
int vq_has_used(struct vq *q);          /* an unconsumed used buffer is visible (no checks) */
int vq_irq_progress(struct vq *q);      /* ISR: the device used buffers since the last call */
void vq_mark_seen(struct vq *q);        /* the waiter accounted for what is visible now */
void vq_update_info(struct vq *q);
uintptr_t vq_mem_size(uint16_t size);   /* ring bytes (enough for split or packed) */

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
    int packed;                          /* packed=1: VIRTIO_F_RING_PACKED */
    uint32_t mq;                         /* mq=N: queue pairs wanted (control queue MQ) */
    int indirect;                        /* indirect=1: TX chains through indirect tables */
    int csum;                            /* csum=1: CSUM + GUEST_CSUM */
    int tso;                             /* tso=1: HOST_TSO4/6 + GUEST_TSO4/6 (implies csum) */
};
extern struct net_opts net_opts;
extern struct vq vdev_rxqs[VDEV_MAX_PAIRS], vdev_txqs[VDEV_MAX_PAIRS], vdev_ctrlq;
extern struct vdev_vq_info vdev_vqs[VDEV_MAX_VQS];
#define vdev_rxq (vdev_rxqs[0])
#define vdev_txq (vdev_txqs[0])
int net_init(void);                      /* probe + bring-up; 0 on success */
int net_restart(int violation);          /* reset the device and rebuild everything */
int net_ready(void);
uint32_t net_pairs(void);
int ksync_tx(struct sk_ring *r);
int ksync_rx(struct sk_ring *r);
uint32_t net_tx_in_flight(void);
void net_violation(uint64_t *counter, const char *name, uint32_t a, uint32_t b);
uint64_t net_features(void);
int net_has(int bit);
/* Interrupt side (called from irq.c's dispatcher with interrupts off). */
void net_irq_intx(void);
void net_irq_vector(uint32_t entry);     /* MSI-X table entry: 0 config, n queue n-1 */
/* Wait for work: WAIT_RX / WAIT_TX arm those queues' notifications, WAIT_KEY returns on
 * console input.  Returns 1 for queue work (interrupt, work found when arming, or the
 * watchdog naming a lost interrupt), 2 for a key, 0 at the deadline.  Without
 * interrupts it polls once and returns 1. */
#define WAIT_RX 1
#define WAIT_TX 2
#define WAIT_KEY 4
int net_wait(uint32_t what, uint64_t deadline);
void net_wait_done(void);                /* disarm every queue (the command is over) */
void net_poll_events(void);              /* report config changes (link) seen so far */
uint32_t flow_hash(const uint8_t *frame, uint32_t len);

/* ---- memory-safety checks and coverage (fuzz.c) ----
 * BUG_ON(cond, what, a, b) guards an access the driver is about to make with a
 * device-controlled index or length: when cond holds it prints one console line
 * `BUG: what a=A b=B at file:line`, counts vdev_bugs and evaluates to 1, so the
 * caller skips the access (like KASAN reporting instead of corrupting).  These
 * never fire while the driver's own validation (check_used, rx_harvest) is
 * right; a fuzzing host treats any BUG line as a finding.  The test-only
 * planted-bug builds (-DPLANT_*, images/bare.py variants) remove or weaken one
 * validation so the check behind it fires. */
extern uint32_t vdev_bugs;
int drv_bug(const char *file, int line, const char *what, uint32_t a, uint32_t b);
#define BUG_ON(cond, what, a, b)                                                         \
    (__builtin_expect(!!(cond), 0) ? drv_bug(__FILE__, __LINE__, (what), (uint32_t)(a), \
                                             (uint32_t)(b))                             \
                                   : 0)
uint32_t pool_md_in_use(void);
/* Wait and poll loops run a number of times that depends on how long they wait, not on
 * what the device did: left out of the coverage map (noise for a fuzzer's novelty). */
#define NO_COV __attribute__((no_sanitize_coverage))

#endif
