/*
 * The packet pool and the user half of a Skywalk channel, laid out in guest
 * memory exactly as vdev/abi/skywalk.h describes, so the host can decode the
 * arena, the rings and every packet straight out of guest RAM.
 *
 * Arena: [sk_arena_hdr][md objects][external buflets][buffers][rings+slots],
 * each region 4096-aligned.  Which objects are allocated is trusted state
 * kept outside the arena (the free stacks below), as in pbufpool.c: the
 * shared metadata is only the user's copy.
 */
#include "driver.h"

#define ALIGN4K(x) (((x) + 4095u) & ~4095u)
#define MD_SIZE ((uint32_t)sizeof(struct sk_md_obj))
#define MD_OFF 4096u
#define BUFLET_OFF ALIGN4K(MD_OFF + POOL_PACKETS * MD_SIZE)
#define BUF_OFF ALIGN4K(BUFLET_OFF + POOL_BUFLETS * (uint32_t)sizeof(struct sk_buflet))
#define RING_OFF ALIGN4K(BUF_OFF + POOL_BUFS * POOL_BUF_SIZE)
#define RING_HDR_STRIDE 128u             /* one struct sk_ring (96 bytes), padded */
#define RING_HDRS (4u * RING_HDR_STRIDE) /* TX, RX, ALLOC, FREE */
#define SLOT_SIZE ((uint32_t)sizeof(struct sk_slot))
#define TX_SLOTS_OFF (RING_OFF + RING_HDRS)
#define RX_SLOTS_OFF (TX_SLOTS_OFF + RING_MAX_SLOTS * SLOT_SIZE)
#define ALLOC_SLOTS_OFF (RX_SLOTS_OFF + RING_MAX_SLOTS * SLOT_SIZE)
#define FREE_SLOTS_OFF (ALLOC_SLOTS_OFF + ALLOC_RING_SLOTS * SLOT_SIZE)
#define RING_REGION (FREE_SLOTS_OFF + FREE_RING_SLOTS * SLOT_SIZE - RING_OFF)
#define ARENA_SIZE ALIGN4K(RING_OFF + RING_REGION)

/* In its own NOLOAD section, outside the .bss the boot code clears: the
 * buffers need no zeroing and clearing 4 MiB under TCG costs boot time. */
uint8_t vdev_arena_mem[ARENA_SIZE] __attribute__((aligned(4096), section(".bss.arena")));
uint32_t vdev_pool_arena;                /* guest address of struct sk_arena_hdr */
uint32_t vdev_tx_ring, vdev_rx_ring;     /* guest addresses of struct sk_ring */
uint32_t vdev_alloc_ring, vdev_free_ring;
struct sk_ring *vdev_tx_ring_p, *vdev_rx_ring_p, *vdev_alloc_ring_p, *vdev_free_ring_p;

/* Trusted allocator state: free stacks and per-object ownership bits. */
static uint32_t md_free[POOL_PACKETS], md_nfree;
static uint32_t bl_free[POOL_BUFLETS], bl_nfree;
static uint32_t buf_free[POOL_BUFS], buf_nfree;
static uint8_t md_owner[POOL_PACKETS], bl_used[POOL_BUFLETS], buf_used[POOL_BUFS];

static struct sk_arena_hdr *arena_hdr(void) { return (struct sk_arena_hdr *)vdev_arena_mem; }

static struct sk_md_obj *md_obj(uint32_t idx)
{
    return (struct sk_md_obj *)(vdev_arena_mem + MD_OFF + idx * MD_SIZE);
}

struct sk_packet *pkt_md(uint32_t idx) { return &md_obj(idx)->pkt; }

uint8_t *buf_addr(uint32_t buf_idx) { return vdev_arena_mem + BUF_OFF + buf_idx * POOL_BUF_SIZE; }

struct sk_buflet *buflet_at(uint32_t idx)
{
    return (struct sk_buflet *)(vdev_arena_mem + BUFLET_OFF + idx * (uint32_t)sizeof(struct sk_buflet));
}

static void ring_setup(struct sk_ring *r, uint32_t kind, uint32_t id, uint32_t nslots, uint64_t slots_off)
{
    memset(r, 0, sizeof(*r));
    r->ring_num_slots = nslots;
    r->ring_kind = kind;
    r->ring_id = id;
    r->buf_size = POOL_BUF_SIZE;
    r->max_frags = POOL_MAX_FRAGS;
    r->md_off = MD_OFF;
    r->buflet_off = BUFLET_OFF;
    r->buf_off = BUF_OFF;
    r->large_buf_off = 0;
    r->slots_off = slots_off;
    r->md_size = MD_SIZE;
    /* Rings the user produces into (TX, FREE) start with every slot but one
     * free for the user; rings the kernel fills (RX, ALLOC) start empty. */
    int user_fills = kind == SK_RING_TX || kind == SK_RING_FREE;
    r->ring_tail = user_fills ? nslots - 1 : 0;
    r->ready_slots = user_fills ? nslots - 1 : 0;
    r->alloc_ws = kind == SK_RING_ALLOC ? ALLOC_WS : 0;
}

/* (Re)build the whole arena.  Used at boot and after a device reset: the
 * reset reclaims every object, nothing is carried over. */
#ifdef PLANT_RESET_LEAK
uint32_t pool_leak_hint;                 /* set by net_restart: TX chains in flight */
#endif

uint32_t pool_md_in_use(void) { return POOL_PACKETS - md_nfree; }

void pool_init(uint32_t tx_slots, uint32_t rx_slots)
{
    struct sk_arena_hdr *h = arena_hdr();
    memset(vdev_arena_mem, 0, BUF_OFF);      /* metadata and buflets; not buffers */
    memset(vdev_arena_mem + RING_OFF, 0, RING_REGION);
    h->magic = SK_ARENA_MAGIC;
    h->abi_version = SK_ABI_VERSION;
    h->num_packets = POOL_PACKETS;
    h->num_buflets = POOL_BUFLETS;
    h->num_bufs = POOL_BUFS;
    h->buf_size = POOL_BUF_SIZE;
    h->num_large_bufs = 0;
    h->large_buf_size = 0;
    h->max_frags = POOL_MAX_FRAGS;
    h->md_size = MD_SIZE;
    h->md_off = MD_OFF;
    h->buflet_off = BUFLET_OFF;
    h->buf_off = BUF_OFF;
    h->large_buf_off = 0;
    h->ring_off = RING_OFF;
    h->ring_region_size = RING_REGION;
    h->arena_size = ARENA_SIZE;
    md_nfree = 0;
    for (uint32_t k = 0; k < POOL_PACKETS; k++) {
        uint32_t i = POOL_PACKETS - 1 - k;
        struct sk_md_obj *o = md_obj(i);
        o->pre.redzone = SK_REDZONE_SEED ^ i;
        o->pkt.idx = i;
        o->pkt.bufs_max = POOL_MAX_FRAGS;
        o->pkt.buf0.buf_idx = SK_NO_INDEX;
        o->pkt.buf0.next_idx = SK_NO_INDEX;
#ifdef PLANT_RESET_LEAK
        /* Planted bug (test-only build): the rebuild forgets the packets the
         * device still held on TX when the reset came; they stay "in use". */
        if (pool_leak_hint) {
            pool_leak_hint--;
            md_owner[i] = OWN_KERNEL;
            continue;
        }
#endif
        md_free[md_nfree++] = i;
        md_owner[i] = OWN_FREE;
    }
    for (uint32_t i = 0; i < POOL_BUFLETS; i++) {
        bl_free[i] = POOL_BUFLETS - 1 - i;
        bl_used[i] = 0;
        buflet_at(i)->next_idx = SK_NO_INDEX;
    }
    bl_nfree = POOL_BUFLETS;
    for (uint32_t i = 0; i < POOL_BUFS; i++) {
        buf_free[i] = POOL_BUFS - 1 - i;
        buf_used[i] = 0;
    }
    buf_nfree = POOL_BUFS;
    if (tx_slots > RING_MAX_SLOTS)
        tx_slots = RING_MAX_SLOTS;
    if (rx_slots > RING_MAX_SLOTS)
        rx_slots = RING_MAX_SLOTS;
    vdev_tx_ring_p = (struct sk_ring *)(vdev_arena_mem + RING_OFF);
    vdev_rx_ring_p = (struct sk_ring *)(vdev_arena_mem + RING_OFF + RING_HDR_STRIDE);
    vdev_alloc_ring_p = (struct sk_ring *)(vdev_arena_mem + RING_OFF + 2 * RING_HDR_STRIDE);
    vdev_free_ring_p = (struct sk_ring *)(vdev_arena_mem + RING_OFF + 3 * RING_HDR_STRIDE);
    ring_setup(vdev_tx_ring_p, SK_RING_TX, 0, tx_slots, TX_SLOTS_OFF);
    ring_setup(vdev_rx_ring_p, SK_RING_RX, 0, rx_slots, RX_SLOTS_OFF);
    ring_setup(vdev_alloc_ring_p, SK_RING_ALLOC, 0, ALLOC_RING_SLOTS, ALLOC_SLOTS_OFF);
    ring_setup(vdev_free_ring_p, SK_RING_FREE, 0, FREE_RING_SLOTS, FREE_SLOTS_OFF);
    vdev_pool_arena = (uint32_t)(uintptr_t)h;
    vdev_tx_ring = (uint32_t)(uintptr_t)vdev_tx_ring_p;
    vdev_rx_ring = (uint32_t)(uintptr_t)vdev_rx_ring_p;
    vdev_alloc_ring = (uint32_t)(uintptr_t)vdev_alloc_ring_p;
    vdev_free_ring = (uint32_t)(uintptr_t)vdev_free_ring_p;
    pool_update_gauges();
}

void pool_update_gauges(void)
{
    vdev_stats.pool_packets_in_use = POOL_PACKETS - md_nfree;
    vdev_stats.pool_buflets_in_use = POOL_BUFLETS - bl_nfree;
    vdev_stats.pool_bufs_in_use = POOL_BUFS - buf_nfree;
}

int pool_buf_alloc(uint32_t *b)
{
    if (!buf_nfree) {
        vdev_stats.alloc_failures++;
        return -1;
    }
    *b = buf_free[--buf_nfree];
    buf_used[*b] = 1;
    return 0;
}

void pool_buf_free(uint32_t b)
{
    if (b < POOL_BUFS && buf_used[b]) {
        buf_used[b] = 0;
        buf_free[buf_nfree++] = b;
    }
}

int pool_buflet_alloc(uint32_t *i)
{
    if (!bl_nfree) {
        vdev_stats.alloc_failures++;
        return -1;
    }
    *i = bl_free[--bl_nfree];
    bl_used[*i] = 1;
    struct sk_buflet *bl = buflet_at(*i);
    memset(bl, 0, sizeof(*bl));
    bl->buf_idx = SK_NO_INDEX;
    bl->next_idx = SK_NO_INDEX;
    return 0;
}

void pool_buflet_free(uint32_t i)
{
    if (i < POOL_BUFLETS && bl_used[i]) {
        bl_used[i] = 0;
        bl_free[bl_nfree++] = i;
    }
}

int pool_md_alloc(uint32_t *idx)
{
    if (!md_nfree) {
        vdev_stats.alloc_failures++;
        return -1;
    }
    uint32_t i = md_free[--md_nfree];
    md_owner[i] = OWN_KERNEL;
    struct sk_md_obj *o = md_obj(i);
    memset(&o->pkt, 0, sizeof(o->pkt));
    o->pre.redzone = SK_REDZONE_SEED ^ i;
    o->pkt.idx = i;
    o->pkt.bufs_max = POOL_MAX_FRAGS;
    o->pkt.buf0.buf_idx = SK_NO_INDEX;
    o->pkt.buf0.next_idx = SK_NO_INDEX;
    *idx = i;
    return 0;
}

int pool_md_valid(uint32_t idx)
{
    return idx < POOL_PACKETS && md_owner[idx] != OWN_FREE &&
           md_obj(idx)->pre.redzone == (SK_REDZONE_SEED ^ idx) && md_obj(idx)->pkt.idx == idx;
}

int pool_md_owner(uint32_t idx)
{
    return idx < POOL_PACKETS ? md_owner[idx] : OWN_FREE;
}

void pool_md_set_owner(uint32_t idx, int owner)
{
    if (idx < POOL_PACKETS && md_owner[idx] != OWN_FREE)
        md_owner[idx] = (uint8_t)owner;
}

/* Grow a packet's buflet chain until it can hold `bytes` after the headroom.
 * (Skywalk hands out extra buflets through a buflet alloc ring; this driver
 * takes that shortcut: the kernel half extends the chain directly.) */
int pool_packet_extend(uint32_t p, uint32_t bytes)
{
    struct sk_packet *pk = pkt_md(p);
    uint32_t room = POOL_BUF_SIZE - pk->buf0.doff;
    struct sk_buflet *last = &pk->buf0;
    for (int n = 1; n < pk->bufs_cnt && last->next_idx < POOL_BUFLETS; n++) {
        last = buflet_at(last->next_idx);
        room += POOL_BUF_SIZE;
    }
    while (room < bytes) {
        uint32_t bi, b;
        if (pk->bufs_cnt >= POOL_MAX_FRAGS) {
            vdev_stats.alloc_failures++;
            return -1;
        }
        if (pool_buflet_alloc(&bi))
            return -1;
        if (pool_buf_alloc(&b)) {
            pool_buflet_free(bi);
            return -1;
        }
        struct sk_buflet *bl = buflet_at(bi);
        bl->buf_idx = b;
        bl->dlim = POOL_BUF_SIZE;
        last->next_idx = bi;
        last = bl;
        pk->bufs_cnt++;
        room += POOL_BUF_SIZE;
    }
    return 0;
}

/* Kernel-side allocation: metadata plus buf0 (and more buflets for `bytes`). */
int pool_packet_alloc(uint32_t *pidx, uint32_t bytes)
{
    uint32_t p, b;
    if (pool_md_alloc(&p))
        return -1;
    struct sk_packet *pk = pkt_md(p);
    if (pool_buf_alloc(&b)) {
        pool_packet_free(p);
        return -1;
    }
    pk->buf0.buf_idx = b;
    pk->buf0.doff = POOL_HEADROOM;
    pk->buf0.dlim = POOL_BUF_SIZE;
    pk->headroom = POOL_HEADROOM;
    pk->bufs_cnt = 1;
    if (pool_packet_extend(p, bytes)) {
        pool_packet_free(p);
        return -1;
    }
    *pidx = p;
    return 0;
}

/* Free a packet and everything its (trusted-bounded) buflet chain names. */
void pool_packet_free(uint32_t p)
{
    if (p >= POOL_PACKETS || md_owner[p] == OWN_FREE)
        return;
    struct sk_packet *pk = pkt_md(p);
    pool_buf_free(pk->buf0.buf_idx);
    uint32_t bi = pk->buf0.next_idx;
    for (int n = 0; bi != SK_NO_INDEX && bi < POOL_BUFLETS && n < POOL_MAX_FRAGS; n++) {
        uint32_t nx = buflet_at(bi)->next_idx;
        pool_buf_free(buflet_at(bi)->buf_idx);
        pool_buflet_free(bi);
        bi = nx;
    }
    pk->buf0.buf_idx = SK_NO_INDEX;
    pk->buf0.next_idx = SK_NO_INDEX;
    md_owner[p] = OWN_FREE;
    md_free[md_nfree++] = p;
}

/* ---- packet alloc/free through the alloc and free rings (user half) ---- */

/* Take the packet at the alloc ring's head (os_channel_packet_alloc): sync
 * the ring first when it is empty; ENOMEM-like -1 if it stays empty. */
int sk_packet_alloc(uint32_t *pidx, uint32_t bytes)
{
    struct sk_ring *r = vdev_alloc_ring_p;
    if (r->ring_head == r->ring_tail)
        sk_sync(r);
    if (r->ring_head == r->ring_tail)
        return -1;
    struct sk_slot *s = sk_slot_at(r, r->ring_head);
    uint32_t p = s->sd_md_idx;
    if (!(s->sd_flags & SK_SD_VALID) || !pool_md_valid(p))
        return -1;
    s->sd_flags = 0;                     /* detach: the packet is ours now */
    s->sd_md_idx = SK_NO_INDEX;
    r->ring_head = ring_next(r, r->ring_head);
    if (bytes > POOL_BUF_SIZE - pkt_md(p)->buf0.doff && pool_packet_extend(p, bytes)) {
        sk_packet_free(p);
        return -1;
    }
    *pidx = p;
    return 0;
}

/* Hand a packet back through the free ring (os_channel_packet_free). */
int sk_packet_free(uint32_t p)
{
    struct sk_ring *r = vdev_free_ring_p;
    if (r->ring_head == r->ring_tail)
        sk_sync(r);                      /* full: let the kernel reclaim */
    if (r->ring_head == r->ring_tail)
        return -1;
    struct sk_slot *s = sk_slot_at(r, r->ring_head);
    s->sd_md_idx = p;
    s->sd_len = 0;
    s->sd_flags = SK_SD_VALID;
    r->ring_head = ring_next(r, r->ring_head);
    return 0;
}

/* Kernel half of the alloc ring: [khead, head) was taken by the user; top
 * the ring up to alloc_ws packets.  Packets in the ring already count as the
 * user's (as in pbufpool.c, they enter the user's upp when attached). */
static int ksync_alloc(struct sk_ring *r)
{
    uint32_t n = r->ring_num_slots, h = r->ring_head;
    if (h >= n)
        return -2;
    for (uint32_t k = r->ring_khead; k != h; k = ring_next(r, k)) {
        struct sk_slot *s = sk_slot_at(r, k);
        s->sd_flags = 0;
        s->sd_md_idx = SK_NO_INDEX;
    }
    r->ring_khead = h;
    uint32_t have = sk_available_slot_count(r);
    while (have < r->alloc_ws && ring_next(r, r->ring_tail) != r->ring_khead) {
        uint32_t p;
        if (pool_packet_alloc(&p, 0))
            break;
        pool_md_set_owner(p, OWN_USER);
        struct sk_slot *s = sk_slot_at(r, r->ring_tail);
        s->sd_md_idx = p;
        s->sd_len = 0;
        s->sd_flags = SK_SD_VALID;
        r->ring_tail = ring_next(r, r->ring_tail);
        have++;
    }
    r->ready_slots = have;
    pool_update_gauges();
    return 0;
}

/* Kernel half of the free ring: reclaim [khead, head), but only packets the
 * user really holds (anything else is counted and ignored). */
static int ksync_free(struct sk_ring *r)
{
    uint32_t n = r->ring_num_slots, h = r->ring_head;
    if (h >= n)
        return -2;
    for (uint32_t k = r->ring_khead; k != h; k = ring_next(r, k)) {
        struct sk_slot *s = sk_slot_at(r, k);
        uint32_t p = s->sd_md_idx;
        if ((s->sd_flags & SK_SD_VALID) && pool_md_valid(p) && pool_md_owner(p) == OWN_USER)
            pool_packet_free(p);
        else
            vdev_stats.free_bad++;
        s->sd_flags = 0;
        s->sd_md_idx = SK_NO_INDEX;
    }
    r->ring_khead = h;
    r->ring_tail = h == 0 ? n - 1 : h - 1;
    r->ready_slots = sk_available_slot_count(r);
    pool_update_gauges();
    return 0;
}

/* Sum the buflet lengths into pkt.len and mark the packet finalized. */
void sk_packet_finalize(uint32_t p)
{
    struct sk_packet *pk = pkt_md(p);
    uint32_t len = pk->buf0.dlen, bi = pk->buf0.next_idx;
    for (int n = 1; bi != SK_NO_INDEX && bi < POOL_BUFLETS && n < POOL_MAX_FRAGS; n++) {
        len += buflet_at(bi)->dlen;
        bi = buflet_at(bi)->next_idx;
    }
    pk->len = len;
    pk->headroom = (uint16_t)pk->buf0.doff;
    pk->qflags |= SK_QUM_FINALIZED;
}

uint8_t *sk_packet_data(uint32_t p)
{
    struct sk_packet *pk = pkt_md(p);
    return buf_addr(pk->buf0.buf_idx) + pk->buf0.doff;
}

/* ---- ring user half (os_channel.c semantics) ---- */

struct sk_slot *sk_slot_at(struct sk_ring *r, uint32_t i)
{
    return (struct sk_slot *)(vdev_arena_mem + (uint32_t)r->slots_off) + i;
}

uint32_t sk_slot_index(struct sk_ring *r, struct sk_slot *s)
{
    return (uint32_t)(s - sk_slot_at(r, 0));
}

/* A slot is the user's iff it lies in [head, tail), modulo wrap. */
static int slot_is_users(struct sk_ring *r, uint32_t i)
{
    uint32_t h = r->ring_head, t = r->ring_tail;
    if (h <= t)
        return i >= h && i < t;
    return i < t || (i >= h && i < r->ring_num_slots);
}

/* NULL prev starts at head; returns NULL when the next slot would be tail. */
struct sk_slot *sk_get_next_slot(struct sk_ring *r, struct sk_slot *prev)
{
    uint32_t i;
    if (prev) {
        i = sk_slot_index(r, prev);
        if (!slot_is_users(r, i))
            return NULL;
        i = ring_next(r, i);
    } else {
        i = r->ring_head;
    }
    if (i == r->ring_tail)
        return NULL;
    return sk_slot_at(r, i);
}

/* Hand everything up to and including s to the kernel side (head = s + 1). */
int sk_advance_slot(struct sk_ring *r, struct sk_slot *s)
{
    uint32_t i = sk_slot_index(r, s);
    if (!slot_is_users(r, i))
        return -1;
    r->ring_head = ring_next(r, i);
    return 0;
}

uint32_t sk_available_slot_count(struct sk_ring *r)
{
    int32_t n;
    if (r->ring_kind == SK_RING_TX || r->ring_kind == SK_RING_FREE) {
        n = (int32_t)r->ring_head - (int32_t)r->ring_khead;
        if (n < 0)
            n += (int32_t)r->ring_num_slots;
        return r->ring_num_slots - (uint32_t)n - 1;
    }
    n = (int32_t)r->ring_tail - (int32_t)r->ring_head;
    if (n < 0)
        n += (int32_t)r->ring_num_slots;
    return (uint32_t)n;
}

int sk_pending(struct sk_ring *r)
{
    return r->ring_head != r->ring_khead;
}

int sk_slot_attach_packet(struct sk_ring *r, struct sk_slot *s, uint32_t p)
{
    if (!slot_is_users(r, sk_slot_index(r, s)) || (s->sd_flags & SK_SD_VALID) || !pool_md_valid(p))
        return -1;
    if (!(pkt_md(p)->qflags & SK_QUM_FINALIZED))
        return -1;
    s->sd_md_idx = p;
    s->sd_len = (uint16_t)(pkt_md(p)->len > 0xffff ? 0xffff : pkt_md(p)->len);
    s->sd_flags = SK_SD_VALID;
    return 0;
}

uint32_t sk_slot_detach_packet(struct sk_ring *r, struct sk_slot *s)
{
    if (!slot_is_users(r, sk_slot_index(r, s)) || !(s->sd_flags & SK_SD_VALID))
        return SK_NO_INDEX;
    uint32_t p = s->sd_md_idx;
    s->sd_flags = 0;
    s->sd_md_idx = SK_NO_INDEX;
    return p;
}

uint32_t sk_slot_get_packet(struct sk_ring *r, struct sk_slot *s)
{
    if (!s || !slot_is_users(r, sk_slot_index(r, s)) || !(s->sd_flags & SK_SD_VALID))
        return SK_NO_INDEX;
    return s->sd_md_idx;
}

int sk_sync(struct sk_ring *r)
{
    switch (r->ring_kind) {
    case SK_RING_TX:
        vdev_stats.tx_syncs++;
        return ksync_tx(r);
    case SK_RING_RX:
        vdev_stats.rx_syncs++;
        return ksync_rx(r);
    case SK_RING_ALLOC:
        vdev_stats.alloc_syncs++;
        return ksync_alloc(r);
    case SK_RING_FREE:
        vdev_stats.free_syncs++;
        return ksync_free(r);
    }
    return -2;
}
