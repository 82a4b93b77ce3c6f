/*
 * Driver side of a virtqueue: split (virtio 1.x, 2.7 "Split Virtqueues")
 * and packed (2.8 "Packed Virtqueues"), with indirect descriptors (2.7.5.3,
 * 2.8.7) and used-buffer notification control (2.7.10, 2.8.10).
 *
 * The device is not trusted: everything it writes (used idx, used elements,
 * used descriptors) is checked against state we keep privately (free list,
 * per-head or per-id state, writable capacity) before it is acted on.  A
 * violation is counted by name and marks the queue broken; the caller then
 * resets the device instead of following a bad index into memory.
 */
#include "driver.h"

#define PF_AVAIL (1u << VRING_PACKED_DESC_F_AVAIL)
#define PF_USED (1u << VRING_PACKED_DESC_F_USED)

static uintptr_t align_up(uintptr_t v, uintptr_t a) { return (v + a - 1) & ~(a - 1); }

/* 2.7.2 Legacy Interfaces: used ring aligned to 4096 after desc+avail.  A
 * packed ring (16 bytes per slot plus two 4-byte event areas) fits in the
 * same space. */
uintptr_t vq_mem_size(uint16_t size)
{
    uintptr_t avail_end = 16u * size + 6u + 2u * size;
    return align_up(avail_end, 4096) + align_up(6u + 8u * size, 4096);
}

static int violation(struct vq *q, uint64_t *counter, const char *name, uint32_t a, uint32_t b)
{
    net_violation(counter, name, a, b);
    q->broken = 1;
    return -1;
}

void vq_init(struct vq *q, uint16_t index, uint16_t size, void *mem, int event_idx, int packed,
             struct vring_desc *indirect_tables)
{
    uint64_t *k = q->kicks, *ks = q->kicks_suppressed, *ir = q->irqs;
    struct vdev_vq_info *info = q->info;
    memset(q, 0, __builtin_offsetof(struct vq, next)); /* the arrays are set up below */
    q->kicks = k;
    q->kicks_suppressed = ks;
    q->irqs = ir;
    q->info = info;
    memset(mem, 0, vq_mem_size(size));
    q->index = index;
    q->size = size;
    q->event_idx = event_idx;
    q->packed = packed;
    q->ind = indirect_tables;
    if (packed) {
        q->pdesc = mem;
        q->drv_event = (volatile struct vring_packed_desc_event *)((uint8_t *)mem + 16u * size);
        q->dev_event = q->drv_event + 1;
        q->avail_wrap = q->used_wrap = q->pk_wrap = 1;
        /* Free ids: 0..size-1 (2.8.13: the id is the driver's, any unique value). */
    } else {
        q->desc = mem;
        q->avail = (volatile struct vring_avail_hdr *)((uint8_t *)mem + 16u * size);
        q->avail_ring = (volatile uint16_t *)((uint8_t *)q->avail + 4);
        q->used_event = q->avail_ring + size;
        q->used = (volatile struct vring_used_hdr *)((uint8_t *)mem +
                                                    align_up(16u * size + 6u + 2u * size, 4096));
        q->used_ring = (volatile struct vring_used_elem *)((uint8_t *)q->used + 4);
        q->avail_event = (volatile uint16_t *)(q->used_ring + size);
    }
    for (uint16_t i = 0; i < size; i++) {
        q->next[i] = (uint16_t)(i + 1);
        q->state[i] = DS_FREE;
    }
    q->num_free = size;
    q->free_head = 0;
    if (info) {
        memset(info, 0, sizeof(*info));
        info->index = index;
        info->size = size;
        info->msix_vector = VIRTIO_MSI_NO_VECTOR;
        info->flags = VDEV_VQF_ACTIVE | (packed ? VDEV_VQF_PACKED : 0) |
                      (event_idx ? VDEV_VQF_EVENT_IDX : 0) | (indirect_tables ? VDEV_VQF_INDIRECT : 0);
        info->desc = (uint32_t)(uintptr_t)mem;
        info->driver = (uint32_t)(uintptr_t)(packed ? (void *)q->drv_event : (void *)q->avail);
        info->device = (uint32_t)(uintptr_t)(packed ? (void *)q->dev_event : (void *)q->used);
    }
    vq_disarm(q);
    vq_update_info(q);
}

void vq_update_info(struct vq *q)
{
    struct vdev_vq_info *i = q->info;
    if (!i)
        return;
    if (q->packed) {
        i->avail_idx = q->avail_pos | (uint32_t)q->avail_wrap << 15;
        i->last_used = q->used_pos | (uint32_t)q->used_wrap << 15;
    } else {
        i->avail_idx = q->avail_shadow;
        i->last_used = q->last_used;
    }
    i->in_flight = q->in_flight;
    i->num_free = q->num_free;
    uint32_t f = i->flags & ~(uint32_t)(VDEV_VQF_ARMED | VDEV_VQF_BROKEN);
    i->flags = f | (q->armed ? VDEV_VQF_ARMED : 0) | (q->broken ? VDEV_VQF_BROKEN : 0);
}

/* ---- adding buffers ---- */

/* The indirect table for `id`: 2.7.5.3 / 2.8.7 "Indirect Flag: Scatter-Gather
 * Support".  Split tables chain with NEXT; in a packed table the length alone
 * delimits the list. */
static uint32_t fill_indirect(struct vq *q, uint16_t id, const struct vq_seg *segs, int n)
{
    struct vring_desc *t = q->ind + (uint32_t)id * IND_MAX;
    for (int k = 0; k < n; k++) {
        if (q->packed) {
            struct vring_packed_desc *p = (struct vring_packed_desc *)&t[k];
            p->addr = segs[k].addr;
            p->len = segs[k].len;
            p->id = 0;
            p->flags = (uint16_t)(segs[k].write ? VRING_DESC_F_WRITE : 0);
        } else {
            t[k].addr = segs[k].addr;
            t[k].len = segs[k].len;
            t[k].flags = (uint16_t)((segs[k].write ? VRING_DESC_F_WRITE : 0) |
                                    (k + 1 < n ? VRING_DESC_F_NEXT : 0));
            t[k].next = (uint16_t)(k + 1 < n ? k + 1 : 0);
        }
    }
    return (uint32_t)(uintptr_t)t;
}

static void note_chain(struct vq *q, uint16_t id, const struct vq_seg *segs, int n, int slots,
                       uint32_t token)
{
    uint32_t wcap = 0, total = 0;
    for (int k = 0; k < n; k++) {
        if (segs[k].write)
            wcap += segs[k].len;
        total += segs[k].len;
    }
    q->chain_len[id] = (uint16_t)slots;
    q->state[id] = DS_POSTED;
    q->token[id] = token;
    q->wcap[id] = wcap;
    q->total[id] = total;
    q->in_flight++;
    if (q->info)
        q->info->posted++;
}

static int split_add(struct vq *q, const struct vq_seg *segs, int n, uint32_t token)
{
    int ind = q->ind != NULL;
    int slots = ind ? 1 : n;
    if (slots > q->num_free)
        return -1;
    uint16_t head = q->free_head, i = head, last = head;
    if (ind) {
        struct vring_desc *d = &q->desc[head];
        d->addr = fill_indirect(q, head, segs, n);
        d->len = (uint32_t)n * 16u;
        d->flags = VRING_DESC_F_INDIRECT;
        d->next = 0;
        i = q->next[head];
    } else {
        for (int k = 0; k < n; k++) {
            struct vring_desc *d = &q->desc[i];
            d->addr = segs[k].addr;
            d->len = segs[k].len;
            d->flags = (uint16_t)((segs[k].write ? VRING_DESC_F_WRITE : 0) |
                                  (k + 1 < n ? VRING_DESC_F_NEXT : 0));
            d->next = k + 1 < n ? q->next[i] : 0;
            last = i;
            i = q->next[i];
        }
        i = q->next[last];
    }
    q->free_head = i;
    q->num_free = (uint16_t)(q->num_free - slots);
    note_chain(q, head, segs, n, slots, token);
    q->avail_ring[q->avail_shadow % q->size] = head;
    q->avail_shadow++;
    return head;
}

/* 2.8.6 "Next Flag: Descriptor Chaining": the chain fills consecutive slots;
 * 2.8.21.1 the head's flags are written last so the device never sees half
 * a chain.  Every descriptor carries the id (the device reads it from the
 * last one). */
static int packed_add(struct vq *q, const struct vq_seg *segs, int n, uint32_t token)
{
    int ind = q->ind != NULL;
    int slots = ind ? 1 : n;
    if (slots > q->num_free || q->free_head >= q->size)
        return -1;
    uint16_t id = q->free_head;
    q->free_head = q->next[id];
    uint16_t head_pos = q->avail_pos, head_flags = 0;
    uint16_t wrap_bits = q->avail_wrap ? (uint16_t)PF_AVAIL : (uint16_t)PF_USED;
    for (int k = 0; k < slots; k++) {
        volatile struct vring_packed_desc *d = &q->pdesc[q->avail_pos];
        uint16_t flags;
        if (ind) {
            d->addr = fill_indirect(q, id, segs, n);
            d->len = (uint32_t)n * 16u;
            flags = VRING_DESC_F_INDIRECT;
        } else {
            d->addr = segs[k].addr;
            d->len = segs[k].len;
            flags = (uint16_t)((segs[k].write ? VRING_DESC_F_WRITE : 0) |
                               (k + 1 < slots ? VRING_DESC_F_NEXT : 0));
        }
        d->id = id;
        flags |= wrap_bits;
        if (k == 0)
            head_flags = flags;
        else
            d->flags = flags;
        if (++q->avail_pos == q->size) {
            q->avail_pos = 0;
            q->avail_wrap ^= 1;
            wrap_bits = q->avail_wrap ? (uint16_t)PF_AVAIL : (uint16_t)PF_USED;
        }
    }
    barrier();                           /* the rest of the chain before the head (x86 TSO) */
    q->pdesc[head_pos].flags = head_flags;
    q->num_free = (uint16_t)(q->num_free - slots);
    q->num_added = (uint16_t)(q->num_added + slots);
    note_chain(q, id, segs, n, slots, token);
    return id;
}

int vq_add(struct vq *q, const struct vq_seg *segs, int n, uint32_t token)
{
    if (q->broken || n <= 0 || n > q->num_free || (q->ind && n > IND_MAX))
        return -1;
    int r = q->packed ? packed_add(q, segs, n, token) : split_add(q, segs, n, token);
    if (r >= 0 && q->ind)
        vdev_stats.tx_indirect++;
    return r;
}

static void count_kick(struct vq *q, int kick)
{
    if (kick) {
        vt_notify(q->index);
        (*q->kicks)++;
        if (q->info)
            q->info->kicks++;
    } else {
        (*q->kicks_suppressed)++;
        if (q->info)
            q->info->kicks_suppressed++;
    }
}

/* 2.7.13.3 "Updating idx" then 2.7.13.4 "Notifying The Device"; packed:
 * 2.8.23 "Notifying The Device" from the device event suppression area. */
void vq_publish(struct vq *q)
{
    if (q->broken)
        return;
    if (q->packed) {
        if (!q->num_added)
            return;
        mb();                            /* descriptors before reading suppression */
        uint16_t added = q->num_added, new_pos = q->avail_pos;
        q->num_added = 0;
        uint16_t flags = q->dev_event->flags & 3, kick = 1;
        if (flags == VRING_PACKED_EVENT_FLAG_DISABLE) {
            kick = 0;
        } else if (flags == VRING_PACKED_EVENT_FLAG_DESC && q->event_idx) {
            /* The device wants a kick when the slot off (with wrap w) becomes
             * available; map it onto our position line and apply the split
             * ring's vring_need_event() to [old, new). */
            uint16_t ow = q->dev_event->off_wrap;
            uint16_t off = ow & 0x7fff, wrap = (uint16_t)(ow >> 15);
            int32_t ev = off, nw = new_pos, old = (int32_t)new_pos - added;
            if (wrap != q->avail_wrap)
                ev -= q->size;
            kick = (uint16_t)(nw - ev - 1) < (uint16_t)(nw - old);
        }
        count_kick(q, kick);
        vq_update_info(q);
        return;
    }
    if (q->avail_shadow == q->kick_old)
        return;                          /* nothing new to publish */
    barrier();                           /* ring entries before idx (x86 TSO) */
    WRITE_ONCE16(q->avail->idx, q->avail_shadow);
    mb();                                /* idx store before reading suppression */
    uint16_t new_idx = q->avail_shadow, old = q->kick_old;
    q->kick_old = new_idx;
    int kick;
    if (q->event_idx) {
        /* vring_need_event(): kick if avail_event lies in [old, new). */
        uint16_t ev = READ_ONCE16(*q->avail_event);
        kick = (uint16_t)(new_idx - ev - 1) < (uint16_t)(new_idx - old);
    } else {
        kick = !(READ_ONCE16(q->used->flags) & VRING_USED_F_NO_NOTIFY);
    }
    count_kick(q, kick);
    vq_update_info(q);
}

/* ---- used buffers ---- */

static int packed_is_used(struct vq *q, uint16_t pos, uint8_t wrap)
{
    uint16_t f = q->pdesc[pos].flags;
    /* 2.8.1: used when AVAIL and USED both equal the used wrap counter. */
    return ((f & PF_AVAIL) != 0) == wrap && ((f & PF_USED) != 0) == wrap;
}

/* Validate one used id against what we posted (shared by both layouts). */
static int check_used(struct vq *q, uint32_t id, uint32_t len, uint32_t k)
{
#ifndef PLANT_NO_USED_ID_CHECK
    if (id >= q->size)
        return violation(q, &vdev_stats.viol_used_id_range, "viol_used_id_range", id, q->index);
#endif
    /* The id indexes the driver's per-descriptor arrays below. */
    if (BUG_ON(id >= q->size, "used id indexes past the queue's state", id, q->size)) {
        q->broken = 1;
        return -1;
    }
    if (q->state[id] == DS_COMPLETED)
        return violation(q, &vdev_stats.viol_double_completion, "viol_double_completion", id,
                         q->index);
    if (q->state[id] != DS_POSTED)
        return violation(q, &vdev_stats.viol_used_id_not_outstanding,
                         "viol_used_id_not_outstanding", id, q->index);
    /* 2.7.8: len is the bytes written into the writable part.  Some devices
     * report the readable length on TX, so TX is checked against the whole
     * chain; a length past the buffer is never accepted. */
    uint32_t cap = q->wcap[id] ? q->wcap[id] : q->total[id];
#ifdef PLANT_RX_OFF_BY_ONE
    if (len > cap + 1)                   /* planted bug (test-only build): one byte too lax */
#else
    if (len > cap)
#endif
        return violation(q, &vdev_stats.viol_used_len, "viol_used_len", len, cap);
    /* The same id twice inside one batch is a double completion too. */
    for (uint32_t j = 0; j < k; j++)
        if (q->peek_id[j] == id)
            return violation(q, &vdev_stats.viol_double_completion, "viol_double_completion", id,
                             q->index);
    return 0;
}

/* Packed: walk used descriptors after the cached ones (at most PEEK_MAX),
 * validating each id; the walk skips a chain's slots by its trusted length. */
static int packed_pending(struct vq *q)
{
    while (q->pk_n < PEEK_MAX && q->pk_n < q->in_flight && packed_is_used(q, q->pk_pos, q->pk_wrap)) {
        barrier();                       /* flags before id and len */
        volatile struct vring_packed_desc *d = &q->pdesc[q->pk_pos];
        uint32_t id = d->id, len = d->len;
        if (check_used(q, id, len, q->pk_n))
            return -1;
        q->peek_id[q->pk_n] = (uint16_t)id;
        q->pk_len[q->pk_n] = len;
        q->pk_n++;
        uint32_t p = (uint32_t)q->pk_pos + q->chain_len[id];
        if (p >= q->size) {
            p -= q->size;
            q->pk_wrap ^= 1;
        }
        q->pk_pos = (uint16_t)p;
    }
    /* A used descriptor while nothing is outstanding: nothing we posted can
     * be there (the split ring's "used idx ran ahead"). */
    if (q->in_flight == 0 && packed_is_used(q, q->pk_pos, q->pk_wrap))
        return violation(q, &vdev_stats.viol_used_idx_jump, "viol_used_idx_jump", q->pk_pos,
                         q->used_pos);
    return q->pk_n;
}

/* How many used entries the device has published; checks the idx itself:
 * it can never be more than what we have outstanding. */
int vq_used_pending(struct vq *q)
{
    if (q->broken)
        return -1;
    if (q->packed)
        return packed_pending(q);
    uint16_t idx = READ_ONCE16(q->used->idx);
    barrier();                           /* read idx before the entries */
    uint16_t n = (uint16_t)(idx - q->last_used);
    if (n > q->in_flight)
        return violation(q, &vdev_stats.viol_used_idx_jump, "viol_used_idx_jump", idx,
                         q->last_used);
    return n;
}

/* Validate the k-th pending used entry (k < vq_used_pending) without
 * consuming it.  0 on success, -1 on a violation (queue is then broken). */
int vq_peek_used(struct vq *q, uint32_t k, uint32_t *token, uint32_t *len)
{
    if (q->packed) {
        if (k >= q->pk_n)
            return -1;
        *token = q->token[q->peek_id[k]];
        *len = q->pk_len[k];
        return 0;
    }
    volatile struct vring_used_elem *e = &q->used_ring[(uint16_t)(q->last_used + k) % q->size];
    uint32_t id = e->id, l = e->len;
    if (check_used(q, id, l, k))
        return -1;
    q->peek_id[k] = (uint16_t)id;        /* consume from our copy, not shared memory */
    *token = q->token[id];
    *len = l;
    return 0;
}

static void park_used_event(struct vq *q)
{
    /* 2.7.10 with EVENT_IDX: the device interrupts when used idx passes
     * used_event, i.e. when vring_need_event(used_event, new, old) holds for
     * the [old, new) it just published.  Armed: the next entry.  Disarmed:
     * half the index space ahead of what we consumed.  (One behind the last
     * consumed is not enough: the device publishes used idx before it decides,
     * so we may already have consumed up to `new`, putting last_used - 1 inside
     * its window.)  Every consume re-parks it, and a ring never holds more than
     * VQ_MAX entries, so the device never gets that far. */
    *q->used_event = (uint16_t)(q->armed ? q->last_used : q->last_used + 0x8000);
}

static void packed_set_event(struct vq *q)
{
    /* 2.8.10: DESC with EVENT_IDX names the next slot we will look at; plain
     * ENABLE interrupts for every used buffer. */
    if (!q->armed) {
        q->drv_event->flags = VRING_PACKED_EVENT_FLAG_DISABLE;
        return;
    }
    if (q->event_idx) {
        q->drv_event->off_wrap = (uint16_t)(q->used_pos | (uint16_t)q->used_wrap << 15);
        barrier();
        q->drv_event->flags = VRING_PACKED_EVENT_FLAG_DESC;
    } else {
        q->drv_event->flags = VRING_PACKED_EVENT_FLAG_ENABLE;
    }
}

/* Retire n entries already validated with vq_peek_used / the packed walk. */
void vq_consume(struct vq *q, uint32_t n)
{
    uint32_t fl = irq_save();            /* the ISR reads these indices (progress()) */
    for (uint32_t k = 0; k < n; k++) {
        uint16_t id = q->peek_id[k];
        uint16_t cnt = q->chain_len[id];
        if (q->packed) {
            q->next[id] = q->free_head;  /* id back onto the free id list */
            q->free_head = id;
            uint32_t p = (uint32_t)q->used_pos + cnt;
            if (p >= q->size) {
                p -= q->size;
                q->used_wrap ^= 1;
            }
            q->used_pos = (uint16_t)p;
            q->used_lin += cnt;
        } else {
            uint16_t i = id;
            for (uint16_t c = 1; c < cnt; c++)
                i = q->next[i];
            q->next[i] = q->free_head;   /* chain back onto the free list */
            q->free_head = id;
            q->last_used++;
        }
        q->num_free = (uint16_t)(q->num_free + cnt);
        q->state[id] = DS_COMPLETED;
        q->in_flight--;
        if (q->info)
            q->info->completed++;
    }
    if (q->packed) {
        /* Shift the validated-ahead cache. */
        for (uint32_t k = n; k < q->pk_n; k++) {
            q->peek_id[k - n] = q->peek_id[k];
            q->pk_len[k - n] = q->pk_len[k];
        }
        q->pk_n = (uint16_t)(q->pk_n - n);
        if (q->armed && q->event_idx)
            packed_set_event(q);
    } else if (q->event_idx) {
        park_used_event(q);
    }
    vq_update_info(q);
    irq_restore(fl);
}

/* ---- notification control (2.7.10 / 2.8.10) ---- */

NO_COV int vq_has_used(struct vq *q)
{
    if (q->broken || !q->size)
        return 0;
    if (q->packed)
        return q->pk_n > 0 || (q->in_flight && packed_is_used(q, q->pk_pos, q->pk_wrap));
    return READ_ONCE16(q->used->idx) != q->last_used;
}

/* Device progress as one number: split, the used idx; packed, the slots the
 * device has used so far (what we consumed plus what is visible after it,
 * walked with our trusted chain lengths, never past what is outstanding). */
static uint32_t progress(struct vq *q)
{
    if (!q->packed)
        return READ_ONCE16(q->used->idx);
    uint32_t lin = q->used_lin, pos = q->used_pos, left = q->in_flight;
    uint8_t wrap = q->used_wrap;
    while (left-- && packed_is_used(q, (uint16_t)pos, wrap)) {
        uint32_t id = q->pdesc[pos].id;
        uint32_t cnt = id < q->size && q->state[id] == DS_POSTED ? q->chain_len[id] : 1;
        lin += cnt;
        pos += cnt;
        if (pos >= q->size) {
            pos -= q->size;
            wrap ^= 1;
        }
    }
    return lin;
}

void vq_mark_seen(struct vq *q)
{
    q->irq_seen = progress(q);
}

int vq_irq_progress(struct vq *q)
{
    if (q->broken || !q->size)
        return 0;
    uint32_t p = progress(q);
    if (p == q->irq_seen)
        return 0;
    q->irq_seen = p;
    return 1;
}

/* Ask for used-buffer notifications.  Returns 1 when used buffers are
 * already visible (they arrived before the device could see the request:
 * the caller must process them instead of waiting, as virtqueue_enable_cb
 * returning false tells a Linux driver). */
int vq_arm(struct vq *q)
{
    if (q->broken || !q->size)
        return 0;
    q->armed = 1;
    if (q->packed)
        packed_set_event(q);
    else if (q->event_idx)
        park_used_event(q);
    else
        q->avail->flags = 0;
    mb();                                /* the request before re-reading the ring */
    /* What is visible now did not raise (and will not raise) a notification
     * for this arming: only later progress is attributed to an interrupt. */
    vq_mark_seen(q);
    vq_update_info(q);
    return vq_has_used(q);
}

void vq_disarm(struct vq *q)
{
    q->armed = 0;
    if (!q->size)
        return;
    if (q->packed)
        packed_set_event(q);
    else if (q->event_idx) {
        park_used_event(q);
        q->avail->flags = 0;
    } else {
        q->avail->flags = VRING_AVAIL_F_NO_INTERRUPT;
    }
    vq_update_info(q);
}

void vq_quiesce_events(struct vq *q)
{
    vq_disarm(q);
}
