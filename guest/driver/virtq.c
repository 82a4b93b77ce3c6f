/*
 * Driver side of a split virtqueue (virtio 1.x, 2.7 "Split Virtqueues").
 *
 * The device is not trusted: everything it writes (used idx, used elements)
 * is checked against state we keep privately (free list, per-head state,
 * writable capacity) before it is acted on.  A violation is counted by name
 * and marks the queue broken; the caller then resets the device instead of
 * following a bad index into memory.
 */
#include "driver.h"

static uintptr_t align_up(uintptr_t v, uintptr_t a) { return (v + a - 1) & ~(a - 1); }

/* 2.7.2 Legacy Interfaces: used ring aligned to 4096 after desc+avail. */
uintptr_t vq_mem_size(uint16_t size)
{
    uintptr_t avail_end = 16u * size + 6u + 2u * size;
    return align_up(avail_end, 4096) + align_up(6u + 8u * size, 4096);
}

void vq_init(struct vq *q, uint16_t index, uint16_t size, void *mem, int event_idx)
{
    uint64_t *k = q->kicks, *ks = q->kicks_suppressed;
    memset(q, 0, sizeof(*q));
    q->kicks = k;
    q->kicks_suppressed = ks;
    memset(mem, 0, vq_mem_size(size));
    q->index = index;
    q->size = size;
    q->event_idx = event_idx;
    q->desc = mem;
    q->avail = (volatile struct vring_avail_hdr *)((uint8_t *)mem + 16u * size);
    q->avail_ring = (volatile uint16_t *)((uint8_t *)q->avail + 4);
    q->used_event = q->avail_ring + size;
    q->used = (volatile struct vring_used_hdr *)((uint8_t *)mem +
                                                align_up(16u * size + 6u + 2u * size, 4096));
    q->used_ring = (volatile struct vring_used_elem *)((uint8_t *)q->used + 4);
    q->avail_event = (volatile uint16_t *)(q->used_ring + size);
    for (uint16_t i = 0; i < size; i++)
        q->next[i] = (uint16_t)(i + 1);
    q->num_free = size;
    q->free_head = 0;
    vq_quiesce_events(q);
}

/* We poll, so ask for no used-buffer notifications.  2.7.10 "Used Buffer
 * Notification Suppression": without EVENT_IDX that is the NO_INTERRUPT
 * flag; with EVENT_IDX the flag is ignored and used_event decides, so park
 * used_event one behind the last entry we consumed (the device notifies only
 * when used idx passes it, i.e. after a full 2^16 wrap we never let happen). */
void vq_quiesce_events(struct vq *q)
{
    if (q->event_idx) {
        *q->used_event = (uint16_t)(q->last_used - 1);
        q->avail->flags = 0;
    } else {
        q->avail->flags = VRING_AVAIL_F_NO_INTERRUPT;
    }
}

int vq_add(struct vq *q, const struct vq_seg *segs, int n, uint32_t token)
{
    if (q->broken || n <= 0 || n > q->num_free)
        return -1;
    uint16_t head = q->free_head, i = head, last = head;
    uint32_t wcap = 0, total = 0;
    for (int k = 0; k < n; k++) {
        struct vring_desc *d = &q->desc[i];
        d->addr = segs[k].addr;
        d->len = segs[k].len;
        d->flags = (uint16_t)((segs[k].write ? VRING_DESC_F_WRITE : 0) |
                              (k + 1 < n ? VRING_DESC_F_NEXT : 0));
        d->next = k + 1 < n ? q->next[i] : 0;
        if (segs[k].write)
            wcap += segs[k].len;
        total += segs[k].len;
        last = i;
        i = q->next[i];
    }
    q->free_head = q->next[last];
    q->num_free = (uint16_t)(q->num_free - n);
    q->chain_len[head] = (uint16_t)n;
    q->state[head] = DS_POSTED;
    q->token[head] = token;
    q->wcap[head] = wcap;
    q->total[head] = total;
    q->avail_ring[q->avail_shadow % q->size] = head;
    q->avail_shadow++;
    q->in_flight++;
    return head;
}

/* 2.7.13.3 "Updating idx" then 2.7.13.4 "Notifying The Device". */
void vq_publish(struct vq *q)
{
    if (q->broken || q->avail_shadow == q->kick_old)
        return;                          /* nothing new to publish */
    barrier();                           /* ring entries before idx (x86 TSO) */
    WRITE_ONCE16(q->avail->idx, q->avail_shadow);
    mb();                                /* idx store before reading suppression */
    uint16_t new_idx = q->avail_shadow, old = q->kick_old;
    q->kick_old = new_idx;
    if (new_idx == old)
        return;
    int kick;
    if (q->event_idx) {
        /* vring_need_event(): kick if avail_event lies in [old, new). */
        uint16_t ev = READ_ONCE16(*q->avail_event);
        kick = (uint16_t)(new_idx - ev - 1) < (uint16_t)(new_idx - old);
    } else {
        kick = !(READ_ONCE16(q->used->flags) & VRING_USED_F_NO_NOTIFY);
    }
    if (kick) {
        vt_notify(q->index);
        (*q->kicks)++;
    } else {
        (*q->kicks_suppressed)++;
    }
}

/* How many used entries the device has published; checks the idx itself:
 * it can never be more than what we have outstanding. */
int vq_used_pending(struct vq *q)
{
    if (q->broken)
        return -1;
    uint16_t idx = READ_ONCE16(q->used->idx);
    barrier();                           /* read idx before the entries */
    uint16_t n = (uint16_t)(idx - q->last_used);
    if (n > q->in_flight) {
        net_violation(&vdev_stats.viol_used_idx_jump, "viol_used_idx_jump", idx, q->last_used);
        q->broken = 1;
        return -1;
    }
    return n;
}

/* Validate the k-th pending used entry (k < vq_used_pending) without
 * consuming it.  0 on success, -1 on a violation (queue is then broken). */
int vq_peek_used(struct vq *q, uint32_t k, uint32_t *token, uint32_t *len)
{
    volatile struct vring_used_elem *e = &q->used_ring[(uint16_t)(q->last_used + k) % q->size];
    uint32_t id = e->id, l = e->len;
    if (id >= q->size) {
        net_violation(&vdev_stats.viol_used_id_range, "viol_used_id_range", id, q->index);
        q->broken = 1;
        return -1;
    }
    if (q->state[id] == DS_COMPLETED) {
        net_violation(&vdev_stats.viol_double_completion, "viol_double_completion", id, q->index);
        q->broken = 1;
        return -1;
    }
    if (q->state[id] != DS_POSTED) {
        net_violation(&vdev_stats.viol_used_id_not_outstanding, "viol_used_id_not_outstanding", id,
                      q->index);
        q->broken = 1;
        return -1;
    }
    /* 2.7.8: len is the bytes written into the writable part.  Some devices
     * report the readable length on TX, so TX is checked against the whole
     * chain; a length past the buffer is never accepted. */
    uint32_t cap = q->wcap[id] ? q->wcap[id] : q->total[id];
    if (l > cap) {
        net_violation(&vdev_stats.viol_used_len, "viol_used_len", l, cap);
        q->broken = 1;
        return -1;
    }
    /* The same id twice inside one batch is a double completion too. */
    for (uint32_t j = 0; j < k; j++) {
        if (q->peek_id[j] == id) {
            net_violation(&vdev_stats.viol_double_completion, "viol_double_completion", id,
                          q->index);
            q->broken = 1;
            return -1;
        }
    }
    q->peek_id[k] = (uint16_t)id;        /* consume from our copy, not shared memory */
    *token = q->token[id];
    *len = l;
    return 0;
}

/* Retire n entries already validated with vq_peek_used. */
void vq_consume(struct vq *q, uint32_t n)
{
    for (uint32_t k = 0; k < n; k++) {
        uint16_t id = q->peek_id[k];
        uint16_t i = id, cnt = q->chain_len[id];
        for (uint16_t c = 1; c < cnt; c++)
            i = q->next[i];
        q->next[i] = q->free_head;       /* chain back onto the free list */
        q->free_head = id;
        q->num_free = (uint16_t)(q->num_free + cnt);
        q->state[id] = DS_COMPLETED;
        q->in_flight--;
        q->last_used++;
    }
    if (q->event_idx)
        *q->used_event = (uint16_t)(q->last_used - 1);
}
