/*
 * One echo turn (vqecho.h): vq_tx -> vq_finish -> sw_forward -> sw_respond -> sw_forward
 * -> vq_rx -> vq_finish, each the same function the stage-by-stage path calls, in the same
 * order and on the same state, so the guest, the pool and the FDB see the same thing.
 * Python is left only the bookkeeping (statistics, the FDB mirror, frees), done after the
 * reply's interrupt is out.
 *
 * The rule that keeps it exact: a stage whose outcome is not the plain one (a drop, a
 * flood, a packet the C cannot judge, a guest short of buffers, ...) ends the turn right
 * after that stage, before anything else is touched, and says which (VE_*); the general
 * Python path takes over from that point with the stage's results, as if it had made the
 * call itself.  Nothing here allocates or frees pool packets after the TX burst, so the
 * frees the bookkeeping does afterwards leave the free lists in the order the
 * stage-by-stage path leaves them.
 */
#include <errno.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "virtio.h"
#include "vqecho.h"

#define DESC_BYTES 16u
#define P_AVAIL_BIT (1u << VRING_PACKED_DESC_F_AVAIL)
#define P_USED_BIT (1u << VRING_PACKED_DESC_F_USED)

static int32_t signal_fd(int32_t fd)
{
    uint64_t one = 1;
    /* vhost-user "Communication": the call fd is an eventfd; a write of 1 adds to it. */
    if (fd < 0)
        return 0;
    if (write(fd, &one, sizeof one) == (ssize_t)sizeof one)
        return 0;
    return errno ? errno : EIO;
}

/* The only destination of a switched burst, or -1 when it has floods, drops or several. */
static int32_t sole_dest(const struct ve_turn *t, uint32_t n)
{
    const struct sw_ret *r = t->sr;
    if (r->code != SW_OK || r->n_special != 0 || r->n_groups != 1 || (uint32_t)t->groups[1] != n)
        return -1;
    return t->groups[0];
}

uint32_t ve_run(struct ve_turn *t)
{
    struct vq_burst *b = t->txb;
    uint32_t n, i, m, k;

    t->tx_notify = t->rx_notify = 0;
    t->tx_errno = t->rx_errno = 0;
    t->n_replies = 0;
    t->n_learned1 = 0;
    t->nbytes1 = 0;
    /* 1. TX, finished in the same call as tx_burst(finish=True) does. */
    vq_tx(t->txq, t->vp, t->hlen, t->budget, t->tx_out, b);
    if (b->stop != VQ_STOP_EMPTY && b->stop != VQ_STOP_BUDGET)
        return t->stage = VE_TX;
    t->tx_notify = vq_finish(t->txq, b->count);
    if (t->tx_notify)
        t->tx_errno = signal_fd(t->tx_fd);
    n = b->npkts;
    if (n == 0)
        return t->stage = VE_TX;
    /* 2. The switch, from the NIC. */
    sw_forward(t->p, t->sb, t->fdb, t->nic_id, t->tx_out, n, t->dest, t->lens, t->learned,
               t->order, t->groups, t->sr);
    /* The learned source MACs, before the responder rewrites the packets in place. */
    k = t->sr->n_learned;
    for (i = 0; i < k; i++) {
        uint8_t h[14];
        sw_packet_head(t->p, t->sb, t->tx_out[t->learned[i]], h);
        memcpy(t->macs + 6 * i, h + 6, 6);
    }
    t->n_learned1 = k;
    t->nbytes1 = t->sr->nbytes;
    if (sole_dest(t, n) != t->resp_id)
        return t->stage = VE_FWD;
    /* 3. The responder answers in place. */
    sw_respond(t->p, t->sb, t->tx_out, n, t->mac, t->ip, t->ports, t->n_sink, t->n_echo,
               t->verdict, t->rr);
    if (t->rr->done != n)
        return t->stage = VE_RESP;
    for (i = m = 0; i < n; i++)
        if (t->verdict[i] == SW_R_REPLY)
            t->replies[m++] = t->tx_out[i];
    t->n_replies = m;
    if (m == 0)
        return t->stage = VE_DONE;
    /* 4. The replies, switched from the responder. */
    sw_forward(t->p, t->sb, t->fdb, t->resp_id, t->replies, m, t->dest, t->lens, t->learned,
               t->order, t->groups, t->sr);
    if (sole_dest(t, m) != t->nic_id || m > t->rx_max)
        return t->stage = VE_FWD2;
    /* 5. RX: every reply written plainly, or the general drain takes over unfinished. */
    t->rxq->rx_waiting = m;
    vq_rx(t->rxq, t->p, t->bufs, t->large, t->hlen, t->rx_flags, t->replies, m, t->rxb);
    if (t->rxb->stop != VQ_STOP_EMPTY || t->rxb->count != m)
        return t->stage = VE_RX;
    t->rx_notify = vq_finish(t->rxq, 1);
    if (t->rx_notify)
        t->rx_errno = signal_fd(t->rx_fd);
    return t->stage = VE_DONE;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* 2.7.6 "The Virtqueue Available Ring" (idx) and 2.8.1 "Driver and Device Ring Wrap
 * Counters" (a descriptor is available when AVAIL matches the wrap counter and USED does
 * not): only reads, so the queue is exactly as it was. */
static int tx_ready(const struct vq_queue *q)
{
    if (q->packed) {
        const volatile uint8_t *d = q->desc + (size_t)(q->last_avail % q->size) * DESC_BYTES;
        uint16_t flags = (uint16_t)(d[14] | (d[15] << 8));
        uint32_t w = q->avail_wrap;
        return !!(flags & P_AVAIL_BIT) == !!w && !!(flags & P_USED_BIT) != !!w;
    }
    return *(const volatile uint16_t *)&q->avail[1] != (uint16_t)q->last_avail;
}

uint32_t ve_tx_wait(const struct vq_queue *q, uint64_t spin_ns)
{
    uint64_t end = now_ns() + spin_ns;
    if (q->size == 0 || q->desc == NULL || q->avail == NULL)
        return 0;
    do {
        for (int i = 0; i < 64; i++) {
            if (tx_ready(q))
                return 1;
            __builtin_ia32_pause();
        }
    } while (now_ns() < end);
    return 0;
}
