/*
 * Compiled virtqueue bursts for split rings (virtio 1.x 2.7 "Split Virtqueues"): the TX
 * chain walk into pool packets and the RX write of pool packets into guest buffers, each
 * one call per burst (cffi releases the GIL around it).
 *
 * The Python code is the reference: vdev/virtio/split.py (pop/push/flush/notify),
 * vdev/virtio/chain.py (walk_chain, Segments, indirect_table), vdev/skywalk/pool.py
 * (packet_from_bytes) and vdev/net/nic.py (the TX loop, _internalize_tx, drain_rx,
 * _write_rx).  This file runs the same checks in the same order on the same fields, with
 * one rule that keeps the two exact: a burst only ever completes items the reference
 * would complete without a drop, a kill or a pool shortage.  On anything else it stops
 * *before* the item with the queue exactly as the reference would have left it after the
 * previous one, and says why (VQ_STOP_SLOW / VQ_STOP_VIOLATION with a code); the Python
 * reference then handles that one item, so kill reasons, details, drop counters and pool
 * failure counts are produced in one place only.
 *
 * Guest memory: every access goes through the g_* helpers below and happens inside the
 * burst function's dynamic extent, so a guard (sigsetjmp around the burst, a SIGBUS
 * handler) can wrap them; state a guard must leave defined is committed item by item into
 * struct vq_queue (an item is either fully accounted there or not at all, apart from the
 * used element a TX chain writes before its copy, which is unpublished until the flush).
 *
 * Memory ordering (2.7.13 / 2.7.8): on x86-64 (TSO) program order is enough for the ring
 * reads and the used-element-before-idx store; the compiler barrier below keeps the
 * compiler from reordering them.
 */
#include <string.h>

#include "virtio.h"
#include "skywalk.h"
#include "virtq.h"
#include "pool_md.h"

#define BARRIER() __asm__ __volatile__("" ::: "memory")
/* Store-then-load orderings need a real fence: x86 lets a load pass an earlier store, so
 * "publish avail_event (or the used idx), then re-read the avail idx (or used_event)"
 * with only a compiler barrier can read the old value while the driver reads ours: a lost
 * kick or interrupt, and the queue waits forever (2.7.10 / 2.8.10 and the driver's mb()
 * in "Driver Requirements: Notifying The Device"; Linux vhost pairs it with smp_mb()). */
#define FULL_FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define U32_MAX 0xFFFFFFFFull
#define MAX_INDIRECT 65536u
#define MAX_FRAME 65550u
#define NET_HDR_LEN 12u

/* ---------------------------------------------------------------- guest memory access */
/*
 * Guest memory may be misaligned for any field here, so every load and store goes through
 * a 1-byte-aligned type and every descriptor field is addressed by its byte offset, never
 * through a struct pointer.  An indirect table may start at any guest address: the spec's
 * alignment rules (2.7.2 / 2.8.2 "Virtqueue Alignment") cover the descriptor table or
 * ring, the avail ring / driver area and the used ring / device area only, and the
 * reference (chain.indirect_table) accepts any address.  Even the rings' own guest
 * addresses, which the backend checks, map to host addresses misaligned by the region's
 * mmap_offset, which vhost-user does not constrain.  A natural-alignment access there is
 * undefined behaviour (UBSan: "misaligned address"); on x86-64 these compile to the same
 * single mov, so each field is still read or written exactly once.
 */
typedef uint16_t __attribute__((aligned(1))) u16_ua;
typedef uint32_t __attribute__((aligned(1))) u32_ua;
typedef uint64_t __attribute__((aligned(1))) u64_ua;
static inline uint16_t g_rd16(const void *p) { return *(const volatile u16_ua *)p; }
static inline uint32_t g_rd32(const void *p) { return *(const volatile u32_ua *)p; }
static inline uint64_t g_rd64(const void *p) { return *(const volatile u64_ua *)p; }
static inline void g_wr16(void *p, uint16_t v) { *(volatile u16_ua *)p = v; }
static inline void g_wr32(void *p, uint32_t v) { *(volatile u32_ua *)p = v; }
static inline void g_copy_from(void *dst, const uint8_t *src, size_t n) { memcpy(dst, src, n); }
static inline void g_copy_to(uint8_t *dst, const void *src, size_t n) { memcpy(dst, src, n); }

/* One descriptor, each field read exactly once (the driver may rewrite it under us). */
struct desc_rd {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

/* Byte offsets of the fields of a split descriptor (2.7.5 struct virtq_desc), a packed one
 * (2.8.13 struct pvirtq_desc, both 16 bytes) and a used element (2.7.8, 8 bytes). */
#define DESC_SIZE 16u
#define D_ADDR 0
#define D_LEN 8
#define D_FLAGS 12
#define D_NEXT 14
#define PD_ID 12
#define PD_FLAGS 14
#define USED_ELEM_SIZE 8u
_Static_assert(sizeof(struct vring_desc) == DESC_SIZE, "2.7.5 descriptor layout");
_Static_assert(sizeof(struct vring_packed_desc) == DESC_SIZE, "2.8.13 descriptor layout");
_Static_assert(sizeof(struct vring_used_elem) == USED_ELEM_SIZE, "2.7.8 used element");

static inline void g_rd_desc(const uint8_t *table, uint32_t i, struct desc_rd *d)
{
    const uint8_t *v = table + (size_t)i * DESC_SIZE;
    d->addr = g_rd64(v + D_ADDR);
    d->len = g_rd32(v + D_LEN);
    d->flags = g_rd16(v + D_FLAGS);
    d->next = g_rd16(v + D_NEXT);
}

/* GuestMemory.gpa_view for length > 0: inside exactly one region, else NULL. */
static uint8_t *gpa_ptr(const struct vq_queue *q, uint64_t addr, uint64_t len)
{
    uint32_t i;
    for (i = 0; i < q->nregions; i++) {
        const struct vq_region *r = &q->regions[i];
        if (addr >= r->gpa && addr - r->gpa < r->size) {
            if (len > r->size - (addr - r->gpa))
                return NULL;
            return r->host + (addr - r->gpa);
        }
    }
    return NULL;
}

/* ---------------------------------------------------------------- chain walk */
struct chain {
    uint32_t head;                /* split head / packed buffer id */
    uint32_t nseg;                /* segments in q->segs from seg0 */
    uint32_t seg0;
    uint32_t nread;               /* how many of them are device-readable (they come first) */
    uint64_t read_len, write_len;
    uint32_t desc_count;
    uint32_t end_idx, end_wrap;   /* packed: the avail position after the chain */
};

/* What chain.Segments collects for one chain while it is walked. */
struct segs_acc {
    uint32_t seg0, nseg, seen_writable, full;
    uint64_t read_len, write_len;
};

/* Segments.add for one buffer descriptor: 0 or a VQV_* code. */
static uint32_t seg_add(struct vq_queue *q, struct segs_acc *a, struct chain *c, uint64_t addr,
                        uint32_t len, uint16_t flags)
{
    if (flags & VRING_DESC_F_WRITE) {
        if (!q->allow_writable)
            return VQV_WRITABLE;
        a->seen_writable = 1;
        a->write_len += len;
    } else {
        if (!q->allow_readable)
            return VQV_READABLE;
        if (a->seen_writable)
            return VQV_ORDER;
        a->read_len += len;
    }
    if (len) {
        uint8_t *p = gpa_ptr(q, addr, len);
        if (p == NULL)
            return VQV_BUF_MEM;
        if (a->seg0 + a->nseg >= q->seg_cap) {
            a->full = 1;  /* keep checking: a violation still wins */
        } else {
            q->segs[a->seg0 + a->nseg].p = p;
            q->segs[a->seg0 + a->nseg].len = len;
        }
        a->nseg++;
        if (!(flags & VRING_DESC_F_WRITE))
            c->nread = a->nseg;
    }
    return 0;
}

/* chain.indirect_table: the checks of a descriptor with INDIRECT set (2.7.5.3.1, 2.8.7). */
static uint32_t indirect_table(struct vq_queue *q, const struct desc_rd *d, uint8_t **t,
                               uint32_t *n)
{
    if (!q->indirect_ok)
        return VQV_INDIRECT_FEATURE;
    if (d->flags & VRING_DESC_F_NEXT)
        return VQV_INDIRECT_NEXT;
    if (d->len == 0 || d->len % DESC_SIZE)
        return VQV_INDIRECT_LEN;
    if (d->len / DESC_SIZE > MAX_INDIRECT)
        return VQV_INDIRECT_MAX;
    *t = gpa_ptr(q, d->addr, d->len);
    if (*t == NULL)
        return VQV_INDIRECT_MEM;
    *n = d->len / DESC_SIZE;
    return 0;
}

static uint32_t chain_finish(struct segs_acc *a, struct chain *c)
{
    if (a->read_len > U32_MAX || a->write_len > U32_MAX)
        return VQV_OVERFLOW;
    c->seg0 = a->seg0;
    c->nseg = a->nseg;
    c->read_len = a->read_len;
    c->write_len = a->write_len;
    return 0;
}

/* chain.walk_chain (split, 2.7.5): 0 or a VQV_* code. */
static uint32_t split_walk(struct vq_queue *q, uint32_t head, struct segs_acc *a, struct chain *c)
{
    const uint8_t *table = q->desc;
    uint32_t limit = q->size, idx = head, count = 0, total = 0, in_indirect = 0, v;
    struct desc_rd d;

    for (;;) {
        g_rd_desc(table, idx, &d);
        count++;
        total++;
        if (count > limit)
            return VQV_LOOP;
        if (total - in_indirect > q->size)
            return VQV_TOO_LONG;
        if (d.flags & VRING_DESC_F_INDIRECT) {
            uint8_t *t;
            uint32_t n;
            if (in_indirect)
                return VQV_NESTED;
            v = indirect_table(q, &d, &t, &n);
            if (v)
                return v;
            /* 2.7.5.3.2: WRITE on the table's descriptor is ignored; go to entry 0. */
            table = t;
            limit = n;
            in_indirect = 1;
            idx = 0;
            count = 0;
            continue;
        }
        v = seg_add(q, a, c, d.addr, d.len, d.flags);
        if (v)
            return v;
        if (!(d.flags & VRING_DESC_F_NEXT))
            break;
        if (d.next >= limit)
            return VQV_NEXT_RANGE;
        idx = d.next;
    }
    c->head = head;
    c->desc_count = total;
    return chain_finish(a, c);
}

/* ---------------------------------------------------------------- packed ring helpers */
#define P_AVAIL (1u << VRING_PACKED_DESC_F_AVAIL)
#define P_USED (1u << VRING_PACKED_DESC_F_USED)

static inline int p_is_avail(uint32_t flags, uint32_t wrap)
{
    return !!(flags & P_AVAIL) == !!wrap && !!(flags & P_USED) != !!wrap;
}

/* Packed descriptor i of the ring, as bytes (see "guest memory access"). */
static inline uint8_t *p_desc(const struct vq_queue *q, uint32_t i)
{
    return q->desc + (size_t)i * DESC_SIZE;
}

static inline int64_t ring_pos(uint32_t idx, uint32_t wrap, uint32_t size)
{
    return wrap ? (int64_t)idx : (int64_t)idx + size;
}

static inline int64_t pmod(int64_t x, int64_t m)
{
    int64_t r = x % m;
    return r < 0 ? r + m : r;
}

/* PackedQueue._walk (2.8.6, 2.8.7) up to the commit: 0 or a VQV_* code. */
static uint32_t packed_walk(struct vq_queue *q, uint32_t first_flags, struct segs_acc *a,
                            struct chain *c)
{
    uint32_t size = q->size, idx = q->last_avail, wrap = q->avail_wrap, count = 0, buf_id = 0, v;
    for (;;) {
        const uint8_t *pd = p_desc(q, idx);
        struct desc_rd d;
        /* 2.8.13: flags are written last by the driver; read them before the rest. */
        uint32_t flags = count ? g_rd16(pd + PD_FLAGS) : first_flags;
        if (count && !p_is_avail(flags, wrap))
            return VQV_NOT_AVAIL;
        d.addr = g_rd64(pd + D_ADDR);
        d.len = g_rd32(pd + D_LEN);
        buf_id = g_rd16(pd + PD_ID);
        d.flags = (uint16_t)flags;
        count++;
        if (count > size)
            return VQV_CHAIN_LONG;
        if (flags & VRING_DESC_F_INDIRECT) {
            uint8_t *t;
            uint32_t n, i;
            if (count > 1)
                return VQV_INDIRECT_AFTER_DIRECT;
            v = indirect_table(q, &d, &t, &n);
            if (v)
                return v;
            if (n > size)
                return VQV_INDIRECT_TOO_LONG;
            for (i = 0; i < n; i++) {
                struct desc_rd e;
                g_rd_desc(t, i, &e);  /* packed table entries: addr, len, id, flags */
                e.flags = g_rd16(t + (size_t)i * DESC_SIZE + PD_FLAGS);
                if (e.flags & VRING_DESC_F_INDIRECT)
                    return VQV_TABLE_NESTED;
                /* NEXT is meaningless in a packed indirect table: its length delimits it */
                v = seg_add(q, a, c, e.addr, e.len, e.flags);
                if (v)
                    return v;
            }
        } else {
            v = seg_add(q, a, c, d.addr, d.len, (uint16_t)flags);
            if (v)
                return v;
        }
        idx++;
        if (idx == size) {
            idx = 0;
            wrap ^= 1;
        }
        if (!(flags & VRING_DESC_F_NEXT))
            break;
    }
    v = chain_finish(a, c);
    if (v)
        return v;
    /* 2.8.6: the buffer id is in the last descriptor of the chain. */
    if (buf_id >= size)
        return VQV_BUF_ID;
    if (q->inflight[buf_id])
        return VQV_ID_INFLIGHT;
    c->head = buf_id;
    c->desc_count = count;
    c->end_idx = idx;
    c->end_wrap = wrap;
    return 0;
}

/* PackedQueue.avail_count, with its scan cache (no violation is possible here). */
static uint32_t packed_avail_count(struct vq_queue *q)
{
    uint32_t size = q->size, idx, wrap, run = 0;
    int64_t start = ring_pos(q->last_avail, q->avail_wrap, size), scanned;
    if (q->scan_end < 0) {
        q->scan_end = start;
        q->scan_chains = 0;
    }
    scanned = pmod(q->scan_end - start, 2 * (int64_t)size);
    idx = (uint32_t)(q->scan_end % size);
    wrap = q->scan_end < size ? 1 : 0;
    while (scanned + run < size) {
        uint32_t flags = g_rd16(p_desc(q, idx) + PD_FLAGS);
        if (!p_is_avail(flags, wrap))
            break;
        run++;
        idx++;
        if (idx == size) {
            idx = 0;
            wrap ^= 1;
        }
        if (!(flags & VRING_DESC_F_NEXT)) {
            scanned += run;
            run = 0;
            q->scan_chains++;
            q->scan_end = ring_pos(idx, wrap, size);
        }
    }
    return q->scan_chains;
}

/* ---------------------------------------------------------------- queue steps (both formats) */
/* avail_count: 0 and *pending, or a VQV_* code (split: HEAD_OOB). */
static uint32_t avail_count(struct vq_queue *q, uint32_t *pending)
{
    uint32_t idx, n;
    if (q->packed) {
        *pending = packed_avail_count(q);
        return 0;
    }
    idx = g_rd16(&q->avail[1]);
    n = (idx - q->last_avail) & 0xFFFF;
    if (n > q->size)
        return VQV_HEAD_OOB;
    q->seen_avail = idx;
    *pending = n;
    return 0;
}

/*
 * pop without committing: 0 with *c filled (or c->head = UINT32_MAX for an empty ring),
 * or a VQV_* code.  pop_commit() then takes the chain.
 */
static uint32_t pop_peek(struct vq_queue *q, uint32_t seg0, struct chain *c, uint32_t *segs_full)
{
    struct segs_acc a = {seg0, 0, 0, 0, 0, 0};
    uint32_t v;
    *segs_full = 0;
    c->head = UINT32_MAX;
    c->nread = 0;
    if (q->packed) {
        uint32_t first = g_rd16(p_desc(q, q->last_avail) + PD_FLAGS);
        if (!p_is_avail(first, q->avail_wrap))
            return 0;
        BARRIER();  /* 2.8.13: the rest of the descriptor after its flags */
        v = packed_walk(q, first, &a, c);
    } else {
        uint32_t last = q->last_avail, slot, head, pending;
        if (q->seen_avail == last) {
            v = avail_count(q, &pending);
            if (v)
                return v;
            if (pending == 0)
                return 0;
        }
        BARRIER();  /* 2.7.13.3: ring entries were written before idx */
        slot = last & (q->size - 1);
        head = g_rd16(&q->avail[2 + slot]);
        if (head >= q->size)
            return VQV_HEAD_RANGE;
        if (q->inflight[head])
            return VQV_HEAD_INFLIGHT;
        v = split_walk(q, head, &a, c);
    }
    if (v) {
        c->head = 0;  /* not "empty" */
        return v;
    }
    *segs_full = a.full;
    return 0;
}

static void pop_commit(struct vq_queue *q, const struct chain *c)
{
    if (q->packed) {
        q->last_avail = c->end_idx;
        q->avail_wrap = c->end_wrap;
        q->ndesc[c->head] = (uint16_t)c->desc_count;
        if (q->scan_chains)
            q->scan_chains--;
        else
            q->scan_end = -1;
    } else {
        uint32_t slot = q->last_avail & (q->size - 1);
        q->last_avail = (q->last_avail + 1) & 0xFFFF;
        q->popped[slot] = (uint16_t)c->head;
    }
    q->inflight[c->head] = c->write_len + 1;
    q->chains++;
    q->descriptors += c->desc_count;
    q->bytes_read += c->read_len;
}

/* The queue state an item may change before it is handed back (see unpop). */
struct vq_save {
    uint32_t last_avail, avail_wrap, scan_chains;
    int64_t scan_end;
    uint64_t chains, descriptors, bytes_read;
};

static void save_state(const struct vq_queue *q, struct vq_save *s)
{
    s->last_avail = q->last_avail;
    s->avail_wrap = q->avail_wrap;
    s->scan_chains = q->scan_chains;
    s->scan_end = q->scan_end;
    s->chains = q->chains;
    s->descriptors = q->descriptors;
    s->bytes_read = q->bytes_read;
}

/* The reference's rewind of the chains of one frame (SplitQueue / PackedQueue.rewind). */
static void rewind_frame(struct vq_queue *q, const struct chain *chains, uint32_t n,
                         const struct vq_save *s)
{
    uint32_t i;
    if (n == 0)
        return;
    for (i = 0; i < n; i++) {
        q->inflight[chains[i].head] = 0;
        if (q->packed)
            q->descriptors -= q->ndesc[chains[i].head];
    }
    q->last_avail = s->last_avail;
    if (q->packed) {
        q->avail_wrap = s->avail_wrap;
        q->scan_end = -1;
    }
    q->chains -= n;
}

/* Undo the pops of one item entirely (counters and caches too): the burst hands the item
 * to the Python reference, which pops the chains again. */
static void unpop(struct vq_queue *q, const struct chain *chains, uint32_t n,
                  const struct vq_save *s)
{
    uint32_t i;
    for (i = 0; i < n; i++)
        q->inflight[chains[i].head] = 0;
    q->last_avail = s->last_avail;
    q->avail_wrap = s->avail_wrap;
    q->scan_chains = s->scan_chains;
    q->scan_end = s->scan_end;
    q->chains = s->chains;
    q->descriptors = s->descriptors;
    q->bytes_read = s->bytes_read;
}

/* push for a head / buffer id this burst popped (2.7.8 / 2.8.9). */
static void push(struct vq_queue *q, uint32_t head, uint32_t written)
{
    q->inflight[head] = 0;
    if (q->packed) {
        q->pend_id[q->npend] = head;
        q->pend_len[q->npend] = written;
        q->pend_nd[q->npend] = q->ndesc[head];
        q->npend++;
    } else {
        uint8_t *e = (uint8_t *)(q->used16 + 2);  /* 2.7.8: flags, idx, then the elements */
        e += (size_t)((q->used_idx + q->pending_used) & (q->size - 1)) * USED_ELEM_SIZE;
        g_wr32(e, head);      /* id */
        g_wr32(e + 4, written);  /* len */
        q->pending_used++;
    }
    q->used++;
    q->bytes_written += written;
}

static inline uint32_t push_room(const struct vq_queue *q)
{
    return q->packed ? q->pend_cap - q->npend : UINT32_MAX;
}

/* enable_notifications(True, ahead) (2.7.10 / 2.8.10): its return value in *more, or a
 * VQV_*.  With EVENT_IDX, ahead > 1 asks for the kick only once ahead more buffers (split) or
 * descriptors (packed) are available; without it, ahead has no meaning. */
static uint32_t rearm(struct vq_queue *q, uint32_t ahead, uint32_t *more)
{
    /* callers pass ahead >= 1 (vq_rx's is 1 unless batching) */
    if (q->packed) {
        if (q->event_idx) {
            uint32_t size = q->size;
            int64_t end;
            packed_avail_count(q);
            end = q->scan_end;
            if (end < 0)
                end = ring_pos(q->last_avail, q->avail_wrap, size);
            end = (end + ahead - 1) % (2 * (int64_t)size);
            g_wr16(&q->used16[0], (uint16_t)((end % size) | (uint32_t)(end < size ? 1 : 0) << 15));
            g_wr16(&q->used16[1], VRING_PACKED_EVENT_FLAG_DESC);
        } else {
            g_wr16(&q->used16[1], VRING_PACKED_EVENT_FLAG_ENABLE);
        }
        FULL_FENCE();  /* a store (event/used idx) then a load of the driver's side */
        *more = p_is_avail(g_rd16(p_desc(q, q->last_avail) + PD_FLAGS), q->avail_wrap);
        return 0;
    }
    if (q->event_idx)
        g_wr16(&q->used16[2 + 4 * q->size], (uint16_t)(g_rd16(&q->avail[1]) + ahead - 1));
    else
        g_wr16(&q->used16[0], 0);
    FULL_FENCE();  /* a store (event/used idx) then a load of the driver's side */
    return avail_count(q, more);
}

static inline int vring_need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

/* packed flush_used (2.8.9): the first descriptor's flags go last, publishing the batch. */
static void packed_flush(struct vq_queue *q)
{
    uint32_t i, first_i = 0, first_flags = 0;
    if (!q->npend)
        return;
    for (i = 0; i < q->npend; i++) {
        uint8_t *d = p_desc(q, q->used_idx);
        uint32_t flags = (q->used_wrap ? P_AVAIL | P_USED : 0) |
                         (q->pend_len[i] ? VRING_DESC_F_WRITE : 0);
        g_wr16(d + PD_ID, (uint16_t)q->pend_id[i]);
        g_wr32(d + D_LEN, q->pend_len[i]);
        if (i == 0) {
            first_i = q->used_idx;
            first_flags = flags;
        } else {
            g_wr16(d + PD_FLAGS, (uint16_t)flags);
        }
        q->used_idx += q->pend_nd[i];
        if (q->used_idx >= q->size) {
            q->used_idx -= q->size;
            q->used_wrap ^= 1;
        }
    }
    BARRIER();
    g_wr16(p_desc(q, first_i) + PD_FLAGS, (uint16_t)first_flags);
    q->npend = 0;
    q->flushes++;
}

/* PackedQueue.should_notify (2.8.10). */
static uint32_t packed_notify(struct vq_queue *q)
{
    uint32_t size = q->size, flags;
    int64_t new_pos = ring_pos(q->used_idx, q->used_wrap, size), old = q->signalled_used;
    uint32_t valid = q->signalled_valid, notify;
    if (valid && old == new_pos)
        return 0;
    q->signalled_used = (uint32_t)new_pos;
    q->signalled_valid = 1;
    flags = g_rd16(&q->avail[1]) & 3;
    if (flags == VRING_PACKED_EVENT_FLAG_DISABLE) {
        notify = 0;
    } else if (flags == VRING_PACKED_EVENT_FLAG_DESC && q->event_idx && valid) {
        uint32_t ow = g_rd16(&q->avail[0]);
        int64_t cycle = 2 * (int64_t)size, event = ring_pos(ow & 0x7FFF, ow >> 15, size);
        notify = pmod(new_pos - event - 1, cycle) < pmod(new_pos - old, cycle);
    } else {
        notify = 1;
    }
    if (notify)
        q->notifications_sent++;
    else
        q->notifications_suppressed++;
    return notify;
}

uint32_t vq_finish(struct vq_queue *q, uint32_t consumed)
{
    uint32_t new_idx, old, valid, notify;
    if (q->packed) {
        packed_flush(q);
        FULL_FENCE();  /* a store (event/used idx) then a load of the driver's side */
        return consumed ? packed_notify(q) : 0;
    }
    if (q->pending_used) {
        q->used_idx = (q->used_idx + q->pending_used) & 0xFFFF;
        q->pending_used = 0;
        BARRIER();  /* 2.7.8.2: the elements before the idx */
        g_wr16(&q->used16[1], (uint16_t)q->used_idx);
        q->flushes++;
    }
    if (!consumed)
        return 0;
    FULL_FENCE();  /* a store (event/used idx) then a load of the driver's side */
    /* SplitQueue.should_notify (2.7.7, 2.7.10, NOTIFY_ON_EMPTY). */
    new_idx = q->used_idx;
    old = q->signalled_used;
    valid = q->signalled_valid;
    if (valid && new_idx == old)
        return 0;
    q->signalled_used = new_idx;
    q->signalled_valid = 1;
    if (q->notify_on_empty && g_rd16(&q->avail[1]) == q->last_avail)
        notify = 1;
    else if (q->event_idx)
        notify = !valid || vring_need_event(g_rd16(&q->avail[2 + q->size]), new_idx, old);
    else
        notify = !(g_rd16(&q->avail[0]) & VRING_AVAIL_F_NO_INTERRUPT);
    if (notify)
        q->notifications_sent++;
    else
        q->notifications_suppressed++;
    return notify;
}

/* ---------------------------------------------------------------- pool (trusted) */
static inline uint8_t *buf_of(const struct fp_pool *p, uint8_t *bufs, uint8_t *large, uint32_t g,
                              uint32_t *size)
{
    if (p->b_large[g]) {
        *size = p->large_buf_size;
        return large + (size_t)p->b_buf[g] * p->large_buf_size;
    }
    *size = p->buf_size;
    return bufs + (size_t)p->b_buf[g] * p->buf_size;
}

/* Pbufpool.packet_from_bytes' buffer choice: nbufs and use_large, or 0 (Python: pool). */
static uint32_t pool_plan(const struct vq_pool *vp, uint64_t n, uint32_t *nbufs, uint32_t *use_large)
{
    const struct fp_pool *p = vp->p;
    uint64_t bs = p->buf_size, nb = n ? (n + bs - 1) / bs : 1;
    *use_large = 0;
    if (nb > p->max_frags || (n > bs && vp->num_large)) {
        uint64_t ls = p->large_buf_size, nl = n ? (n + ls - 1) / ls : 1;
        if (vp->num_large && nl <= p->max_frags) {
            if (nl <= vp->free_large_len) {
                *use_large = 1;
                nb = nl;
            } else if (nb > p->max_frags) {
                return 0;  /* alloc failure */
            }
        } else if (nb > p->max_frags) {
            return 0;  /* PoolError: never fits */
        }
    }
    /* alloc_packets(1, nb) */
    if (vp->free_pkts_len == 0)
        return 0;
    if (nb > 1 && vp->free_ext_len / (nb - 1) == 0)
        return 0;
    /* Only the tops handed in can be popped here; deeper entries are Python's. */
    if (vp->n_pkts == 0 || nb - 1 > vp->n_ext || (*use_large && nb > vp->n_large))
        return 0;
    *nbufs = (uint32_t)nb;
    return 1;
}

/* alloc_packets(1, nbufs) + the copy loop of packet_from_bytes: the frame is the chain's
 * readable bytes from offset skip (scatter from segments, or from a contiguous frame). */
static uint32_t pool_fill(struct vq_pool *vp, uint32_t nbufs, uint32_t use_large,
                          const struct vq_seg *segs, uint32_t nseg, uint64_t skip,
                          const uint8_t *flat, uint64_t n, const uint8_t *vnet,
                          struct vq_burst *b)
{
    const struct fp_pool *p = vp->p;
    uint32_t idx, g, si = 0;
    uint64_t pos = 0, soff = skip;

    idx = vp->free_pkts[--vp->n_pkts];
    vp->free_pkts_len--;
    b->partial_pkt = idx;  /* allocated from here on; cleared once its data is in */
    /* the external buflets come off the top of the free list, as Pbufpool pops them */
    pool_init_packet(p, idx, nbufs, vp->free_ext, (int64_t)vp->n_ext - 1, -1);
    vp->n_ext -= nbufs - 1;
    vp->free_ext_len -= nbufs - 1;
    /* skip the segments' first skip bytes (the vnet header) */
    while (!flat && si < nseg && soff >= segs[si].len) {
        soff -= segs[si].len;
        si++;
    }
    g = idx;
    for (;;) {
        uint32_t size;
        uint8_t *base;
        uint64_t chunk;
        if (use_large) {
            uint32_t lb = vp->free_large[--vp->n_large];
            vp->free_large_len--;
            p->b_buf[g] = lb;
            p->b_large[g] = 1;
        }
        base = buf_of(p, vp->bufs, vp->large, g, &size);
        chunk = n - pos < size ? n - pos : size;
        if (flat) {
            memcpy(base, flat + pos, chunk);
        } else {
            uint64_t done = 0;
            while (done < chunk) {
                uint64_t take = segs[si].len - soff;
                if (take > chunk - done)
                    take = chunk - done;
                g_copy_from(base + done, segs[si].p + soff, take);
                done += take;
                soff += take;
                if (soff == segs[si].len) {
                    si++;
                    soff = 0;
                }
            }
        }
        p->b_doff[g] = 0;
        p->b_dlen[g] = (uint32_t)chunk;
        pos += chunk;
        if (p->b_next[g] == SK_NO_INDEX)
            break;
        g = p->num_packets + p->b_next[g];
    }
    p->pkt_len[idx] = (uint32_t)n;
    memcpy(p->pkt_vnet + (size_t)idx * NET_HDR_LEN, vnet, NET_HDR_LEN);
    p->pkt_pflags[idx] = SK_PKT_VNET_HDR;
    b->partial_pkt = UINT32_MAX;
    return idx;
}

/* Gather n bytes of the segments from offset skip into dst. */
static void gather(const struct vq_seg *segs, uint32_t nseg, uint64_t skip, uint8_t *dst, uint64_t n)
{
    uint32_t si = 0;
    uint64_t done = 0;
    while (si < nseg && skip >= segs[si].len) {
        skip -= segs[si].len;
        si++;
    }
    while (done < n && si < nseg) {
        uint64_t take = segs[si].len - skip;
        if (take > n - done)
            take = n - done;
        g_copy_from(dst + done, segs[si].p + skip, take);
        done += take;
        skip = 0;
        si++;
    }
}

/* checksum.complete_checksum in place (5.1.6.2 "Packet Transmission"). */
static void complete_checksum(uint8_t *f, uint64_t len, uint32_t start, uint32_t offset)
{
    uint64_t where = (uint64_t)start + offset, i, sum = 0;
    uint32_t csum;
    if (start >= len || where + 2 > len)
        return;
    for (i = start; i + 1 < len; i += 2)
        sum += (uint32_t)f[i] << 8 | f[i + 1];
    if (i < len)
        sum += (uint32_t)f[i] << 8;
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    csum = ~sum & 0xFFFF;
    if (csum == 0 && offset == 6)
        csum = 0xFFFF;  /* UDP: a computed 0 is sent as all ones (RFC 768) */
    f[where] = (uint8_t)(csum >> 8);
    f[where + 1] = (uint8_t)csum;
}

static int args_ok(const struct vq_queue *q)
{
    if (!q->size || q->size > 32768 || !q->desc || !q->avail || !q->used16 || !q->segs ||
        !q->seg_cap || !q->scratch || q->scratch_cap < NET_HDR_LEN + MAX_FRAME)
        return 0;
    if (q->packed)
        return q->ndesc && q->pend_id && q->pend_len && q->pend_nd && q->npend <= q->pend_cap &&
               q->last_avail < q->size && q->used_idx < q->size;
    return !(q->size & (q->size - 1)) && q->popped;
}

/* ---------------------------------------------------------------- TX */
static int lists_ok(const struct vq_pool *vp)
{
    for (int i = 0; i < 3; i++)
        if (!vp->lists[i] || !vp->lists[i]->v || vp->lists[i]->n > vp->lists[i]->cap)
            return 0;
    return 1;
}

/* The burst's view of list i: its tops at *top, *n of them, the real length *len. */
static void view_in_place(struct vq_pool *vp)
{
    uint32_t **tops[3] = {&vp->free_pkts, &vp->free_ext, &vp->free_large};
    uint32_t *ns[3] = {&vp->n_pkts, &vp->n_ext, &vp->n_large};
    uint32_t *lens[3] = {&vp->free_pkts_len, &vp->free_ext_len, &vp->free_large_len};
    for (int i = 0; i < 3; i++) {
        *tops[i] = vp->lists[i]->v;
        *ns[i] = *lens[i] = vp->took[i] = vp->lists[i]->n;
    }
}

uint32_t vq_pool_reserve(struct vq_pool *vp, uint32_t kp, uint32_t ke, uint32_t kl)
{
    uint32_t want[3] = {kp, ke, kl};
    if (vp->reserved || !lists_ok(vp))
        return 1;
    view_in_place(vp);
    uint32_t **tops[3] = {&vp->free_pkts, &vp->free_ext, &vp->free_large};
    uint32_t *ns[3] = {&vp->n_pkts, &vp->n_ext, &vp->n_large};
    for (int i = 0; i < 3; i++) {
        struct fl_stack *l = vp->lists[i];
        uint32_t k = want[i];
        if (k > l->n)
            k = l->n;
        if (k > vp->own_cap[i])
            k = vp->own_cap[i];
        if (k && !vp->own[i])
            return 1;
        memcpy(vp->own[i], l->v + (l->n - k), (size_t)k * 4);
        l->n -= k;
        *tops[i] = vp->own[i];
        *ns[i] = vp->took[i] = k;
    }
    vp->reserved = 1;
    return 0;
}

uint32_t vq_pool_unreserve(struct vq_pool *vp)
{
    uint32_t *ns[3] = {&vp->n_pkts, &vp->n_ext, &vp->n_large};
    if (!vp->reserved || !lists_ok(vp))
        return 1;
    for (int i = 0; i < 3; i++) {
        struct fl_stack *l = vp->lists[i];
        uint32_t k = *ns[i];
        if (k > vp->took[i] || l->n + k > l->cap)
            return 1;
        memcpy(l->v + l->n, vp->own[i], (size_t)k * 4);
        l->n += k;
    }
    vp->reserved = 0;
    return 0;
}

static uint32_t tx_loop(struct vq_queue *q, struct vq_pool *vp, uint32_t hlen, uint32_t budget,
                        uint32_t *out, struct vq_burst *b);

/* Without a reservation the burst pops the pool's lists in place (the caller holds the
 * pool's lock) and their lengths are written back whatever stopped it. */
uint32_t vq_tx(struct vq_queue *q, struct vq_pool *vp, uint32_t hlen, uint32_t budget,
                     uint32_t *out, struct vq_burst *b)
{
    uint32_t stop;
    memset(b, 0, sizeof(*b));
    b->partial_pkt = UINT32_MAX;
    if (!args_ok(q) || hlen > NET_HDR_LEN || hlen < 10 || !lists_ok(vp)) {
        b->stop = VQ_STOP_BADARGS;
        return b->stop;
    }
    if (vp->reserved)
        return tx_loop(q, vp, hlen, budget, out, b);
    view_in_place(vp);
    stop = tx_loop(q, vp, hlen, budget, out, b);
    vp->lists[0]->n = vp->n_pkts;
    vp->lists[1]->n = vp->n_ext;
    vp->lists[2]->n = vp->n_large;
    return stop;
}

static uint32_t tx_loop(struct vq_queue *q, struct vq_pool *vp, uint32_t hlen, uint32_t budget,
                        uint32_t *out, struct vq_burst *b)
{
    while (b->count < budget) {
        struct chain c;
        uint32_t v, full, nbufs, use_large, pending, pkt;
        uint8_t hdr[NET_HDR_LEN];
        uint64_t flen;

        v = pop_peek(q, 0, &c, &full);
        if (v) {
            b->stop = VQ_STOP_VIOLATION;
            b->violation = v;
            return b->stop;
        }
        if (c.head == UINT32_MAX) {
            /* Kick mitigation: the device polls this ring again itself, so it asks for
             * no kick (vdev/net/kickhold.py). */
            if (q->hold_kick) {
                b->stop = VQ_STOP_EMPTY;
                return b->stop;
            }
            /* 2.7.10 / 2.8.10: re-arm the kick; if buffers raced in, go on. */
            v = rearm(q, 1, &pending);
            if (v) {
                b->stop = VQ_STOP_VIOLATION;
                b->violation = v;
                return b->stop;
            }
            if (pending)
                continue;
            b->stop = VQ_STOP_EMPTY;
            return b->stop;
        }
        if (full || !push_room(q)) {
            b->stop = VQ_STOP_SLOW;
            b->slow = VQS_SEGS;
            return b->stop;
        }
        if (c.read_len < hlen + 14u) {
            b->stop = VQ_STOP_SLOW;
            b->slow = VQS_RUNT;
            return b->stop;
        }
        if (c.read_len - hlen > MAX_FRAME) {
            b->stop = VQ_STOP_SLOW;
            b->slow = VQS_OVERSIZE;
            return b->stop;
        }
        flen = c.read_len - hlen;
        if (!pool_plan(vp, flen, &nbufs, &use_large)) {
            b->stop = VQ_STOP_SLOW;
            b->slow = VQS_POOL;
            return b->stop;
        }
        /* The chain is the reference's: pop, push (nothing written), internalize. */
        pop_commit(q, &c);
        push(q, c.head, 0);
        memset(hdr, 0, sizeof(hdr));
        gather(q->segs, c.nread, 0, hdr, hlen);
        if ((hdr[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM) && hdr[1] == VIRTIO_NET_HDR_GSO_NONE) {
            /* CSUM: the guest left the checksum to the device; complete it so every
             * consumer sees a valid frame, and drop NEEDS_CSUM from the header. */
            uint32_t cs = hdr[6] | (uint32_t)hdr[7] << 8, co = hdr[8] | (uint32_t)hdr[9] << 8;
            gather(q->segs, c.nread, hlen, q->scratch, flen);
            complete_checksum(q->scratch, flen, cs, co);
            hdr[0] = 0;
            hdr[1] = 0;
            pkt = pool_fill(vp, nbufs, use_large, NULL, 0, 0, q->scratch, flen, hdr, b);
        } else {
            pkt = pool_fill(vp, nbufs, use_large, q->segs, c.nread, hlen, NULL, flen, hdr, b);
        }
        out[b->npkts++] = pkt;
        b->count++;
        b->nbytes += flen;
    }
    b->stop = VQ_STOP_BUDGET;
    return b->stop;
}

/* ---------------------------------------------------------------- RX */
/* Scatter len bytes of src into the writable segments of c from offset 0: bytes written. */
static uint64_t write_into(const struct vq_queue *q, const struct chain *c, const uint8_t *src,
                           uint64_t len)
{
    uint64_t done = 0;
    uint32_t i;
    for (i = c->nread; i < c->nseg && done < len; i++) {
        const struct vq_seg *s = &q->segs[c->seg0 + i];
        uint64_t take = s->len < len - done ? s->len : len - done;
        g_copy_to(s->p, src + done, take);
        done += take;
    }
    return done;
}

#define RX_MAX_CHAINS 256

uint32_t vq_rx(struct vq_queue *q, const struct fp_pool *p, uint8_t *bufs, uint8_t *large,
                     uint32_t hlen, uint32_t flags, const uint32_t *pkts, uint32_t n,
                     struct vq_burst *b)
{
    struct chain chains[RX_MAX_CHAINS];
    uint32_t mergeable = flags & VQ_RX_MERGEABLE;

    memset(b, 0, sizeof(*b));
    b->partial_pkt = UINT32_MAX;
    if (!args_ok(q) || hlen > NET_HDR_LEN || hlen < 10) {
        b->stop = VQ_STOP_BADARGS;
        return b->stop;
    }
    while (b->count < n) {
        uint32_t pkt = pkts[b->count], v, before, pending, nch = 0, ahead;
        uint32_t seg0 = 0, g, full, i;
        struct vq_save start;
        uint64_t flen = 0, total, room = 0, off;
        uint8_t *data = q->scratch;
        const uint8_t *vnet;
        static const uint8_t zero_vnet[NET_HDR_LEN];

        if (pkt >= p->num_packets || p->pkt_state[pkt] != PKT_ALLOCATED) {
            b->stop = VQ_STOP_BADARGS;
            return b->stop;
        }
        /* drain_rx: before = avail_count() */
        v = avail_count(q, &before);
        if (v)
            goto violation;
        /* _write_rx: the frame and its header, from trusted pool state */
        vnet = (p->pkt_pflags[pkt] & SK_PKT_VNET_HDR) ? p->pkt_vnet + (size_t)pkt * NET_HDR_LEN
                                                      : zero_vnet;
        if (vnet[1] != VIRTIO_NET_HDR_GSO_NONE) {
            b->stop = VQ_STOP_SLOW;
            b->slow = VQS_GSO;
            return b->stop;
        }
        if ((vnet[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM) && !(flags & VQ_RX_GUEST_CSUM)) {
            /* the reference completes the checksum for a guest without GUEST_CSUM */
            b->stop = VQ_STOP_SLOW;
            b->slow = VQS_RX_CSUM;
            return b->stop;
        }
        memcpy(data, vnet, hlen);
        g = pkt;
        for (;;) {
            uint32_t size;
            uint8_t *base = buf_of(p, bufs, large, g, &size);
            uint32_t dl = p->b_dlen[g];
            if (flen + dl > MAX_FRAME) {
                b->stop = VQ_STOP_SLOW;
                b->slow = VQS_OVERSIZE;
                return b->stop;
            }
            memcpy(data + hlen + flen, base + p->b_doff[g], dl);
            flen += dl;
            if (p->b_next[g] == SK_NO_INDEX)
                break;
            g = p->num_packets + p->b_next[g];
        }
        total = hlen + flen;
        save_state(q, &start);
        while (room < total) {
            struct chain *c;
            if (nch == RX_MAX_CHAINS) {
                unpop(q, chains, nch, &start);
                b->stop = VQ_STOP_SLOW;
                b->slow = VQS_SEGS;
                return b->stop;
            }
            v = avail_count(q, &pending);
            if (v) {
                unpop(q, chains, nch, &start);
                goto violation;
            }
            if (pending == 0)
                break;
            c = &chains[nch];
            v = pop_peek(q, seg0, c, &full);
            if (v) {
                unpop(q, chains, nch, &start);
                goto violation;
            }
            if (c->head == UINT32_MAX)
                break;  /* pop() gave None: no room */
            if (full || push_room(q) <= nch) {
                unpop(q, chains, nch, &start);
                b->stop = VQ_STOP_SLOW;
                b->slow = VQS_SEGS;
                return b->stop;
            }
            pop_commit(q, c);
            seg0 += c->nseg;
            nch++;
            room += c->write_len;
            if (!mergeable)
                break;
        }
        if (room < total) {
            if (nch && !mergeable) {
                /* one buffer without MRG_RXBUF, too small: Python drops the frame */
                unpop(q, chains, nch, &start);
                b->stop = VQ_STOP_SLOW;
                b->slow = VQS_RX_SMALL;
                return b->stop;
            }
            /* no room: give the buffers back (as the reference's rewind), re-arm (2.7.10);
             * if buffers arrived meanwhile, go round again */
            rewind_frame(q, chains, nch, &start);
            /* RX kick batching (vdev/net/rxbatch.py): while frames wait, the refill kick
             * is asked for after min(kick_ahead, frames waiting) buffers */
            ahead = 1;
            if (q->kick_ahead > 1 && q->rx_waiting > b->count) {
                ahead = q->rx_waiting - b->count;
                if (ahead > q->kick_ahead)
                    ahead = q->kick_ahead;
            }
            v = rearm(q, ahead, &pending);
            if (v)
                goto violation;
            v = avail_count(q, &pending);
            if (v)
                goto violation;
            if (pending > before)
                continue;
            b->stop = VQ_STOP_NOROOM;
            return b->stop;
        }
        if (hlen == NET_HDR_LEN) {
            uint16_t nb = mergeable ? (uint16_t)nch : 1;
            data[10] = (uint8_t)nb;
            data[11] = (uint8_t)(nb >> 8);
        }
        off = 0;
        for (i = 0; i < nch; i++) {
            uint64_t w = write_into(q, &chains[i], data + off, total - off);
            push(q, chains[i].head, (uint32_t)w);
            off += w;
        }
        b->count++;
        b->nbytes += flen;
        if (nch > 1)
            b->merged++;
        continue;
violation:
        b->stop = VQ_STOP_VIOLATION;
        b->violation = v;
        return b->stop;
    }
    b->stop = VQ_STOP_EMPTY;
    return b->stop;
}
