/*
 * The per-burst loop of vdev/net/switch.py's Switch.forward, decision for decision: read
 * the first 14 bytes of each packet (across buflets, from trusted pool state only), learn
 * the source MAC unless it is a group address, then look up the destination (IEEE 802.3
 * group bit = multicast/broadcast -> flood).  What Python keeps: the endpoints, statistics,
 * taps, flood copies and the delivery calls.
 */
#include <string.h>

#include "skywalk.h"
#include "switch.h"

#define ETH_HLEN 14

static inline uint32_t slot_of(uint64_t mac)
{
    uint64_t h = mac * 0x9E3779B97F4A7C15ull;
    return (uint32_t)(h >> 51) & (SW_FDB_SLOTS - 1);
}

#define USED (1ull << 63)

int32_t sw_fdb_get(const struct sw_fdb *fdb, uint64_t mac)
{
    uint32_t s = slot_of(mac);
    uint64_t k = mac | USED;
    for (;;) {
        uint64_t e = fdb->key[s];
        if (e == k)
            return fdb->val[s];
        if (e == 0)
            return SW_FLOOD;
        s = (s + 1) & (SW_FDB_SLOTS - 1);
    }
}

/* Returns the slot holding mac, or the empty slot where it would go. */
static uint32_t find(const struct sw_fdb *fdb, uint64_t mac)
{
    uint32_t s = slot_of(mac);
    uint64_t k = mac | USED;
    while (fdb->key[s] != 0 && fdb->key[s] != k)
        s = (s + 1) & (SW_FDB_SLOTS - 1);
    return s;
}

uint32_t sw_fdb_set(struct sw_fdb *fdb, uint64_t mac, int32_t v)
{
    uint32_t s = find(fdb, mac);
    if (fdb->key[s] == 0) {
        if (fdb->count >= SW_FDB_MAX)
            return SW_FDB_FULL;
        fdb->key[s] = mac | USED;
        fdb->count++;
    }
    fdb->val[s] = v;
    return SW_OK;
}

void sw_fdb_clear(struct sw_fdb *fdb)
{
    memset(fdb->key, 0, sizeof(fdb->key));
    fdb->count = 0;
}

/* Pbufpool.packet_head(idx, 14): the first bytes of the packet's data windows. */
static uint32_t head_of(const struct fp_pool *p, const struct sw_bufs *b, uint32_t idx,
                        uint8_t *out)
{
    uint32_t got = 0, g = idx;
    for (;;) {
        uint32_t dlen = p->b_dlen[g], take = dlen < ETH_HLEN - got ? dlen : ETH_HLEN - got;
        if (take) {
            const uint8_t *base = p->b_large[g]
                ? b->large + (uint64_t)p->b_buf[g] * p->large_buf_size
                : b->buf + (uint64_t)p->b_buf[g] * p->buf_size;
            memcpy(out + got, base + p->b_doff[g], take);
            got += take;
        }
        if (got == ETH_HLEN || p->b_next[g] == SK_NO_INDEX || p->b_next[g] >= p->num_ext)
            return got;
        g = p->num_packets + p->b_next[g];
    }
}

static inline uint64_t mac_at(const uint8_t *m)
{
    uint64_t v = 0;
    int i;
    for (i = 0; i < 6; i++)
        v = (v << 8) | m[i];
    return v;
}

uint32_t sw_forward(const struct fp_pool *p, const struct sw_bufs *b, struct sw_fdb *fdb,
                    int32_t src, const uint32_t *pkts, uint32_t n, int32_t *dest, uint32_t *lens,
                    uint32_t *learned, uint32_t *order, int32_t *groups, struct sw_ret *r)
{
    uint32_t i, nspecial = 0, nlearned = 0, ngroups = 0;
    uint64_t nbytes = 0;

    r->code = SW_OK;
    for (i = 0; i < n; i++) {
        uint8_t h[ETH_HLEN];
        uint32_t idx = pkts[i];
        int32_t out;
        lens[i] = p->pkt_len[idx];
        nbytes += lens[i];
        if (head_of(p, b, idx, h) < ETH_HLEN) {
            dest[i] = SW_SHORT;
            nspecial++;
            continue;
        }
        if (!(h[6] & 1)) {  /* learn an individual source address */
            uint64_t smac = mac_at(h + 6);
            uint32_t s = find(fdb, smac);
            if (fdb->key[s] == 0 || fdb->val[s] != src) {
                if (sw_fdb_set(fdb, smac, src) != SW_OK) {
                    r->code = SW_FDB_FULL;  /* nothing of this burst is decided yet */
                    r->n_learned = nlearned;
                    return SW_FDB_FULL;
                }
                learned[nlearned++] = i;
            }
        }
        out = (h[0] & 1) ? SW_FLOOD : sw_fdb_get(fdb, mac_at(h));
        if (out >= 0 && out != src) {
            dest[i] = out;
        } else if (out == src) {
            dest[i] = SW_HAIRPIN;
            nspecial++;
        } else {
            dest[i] = SW_FLOOD;
            nspecial++;
        }
    }
    if (nspecial == 0) {  /* group by destination, in order of first appearance */
        uint32_t g, k = 0;
        for (i = 0; i < n; i++) {
            for (g = 0; g < ngroups; g++)
                if (groups[2 * g] == dest[i])
                    break;
            if (g == ngroups) {
                groups[2 * ngroups] = dest[i];
                groups[2 * ngroups + 1] = 0;
                ngroups++;
            }
            groups[2 * g + 1]++;
        }
        for (g = 0; g < ngroups; g++)
            for (i = 0; i < n; i++)
                if (dest[i] == groups[2 * g])
                    order[k++] = pkts[i];
    }
    r->n_special = nspecial;
    r->n_learned = nlearned;
    r->n_groups = ngroups;
    r->nbytes = nbytes;
    return SW_OK;
}

/* Responder.answer's first test, for a burst: keep[] gets the positions of the packets it
 * could answer (ARP to anyone, IPv4 to mac), in order; the others it would ignore.  A
 * packet whose vnet header asks for checksum completion is always kept: the completion
 * runs before answer() and could rewrite the very header bytes tested here. */
uint32_t sw_answerable(const struct fp_pool *p, const struct sw_bufs *b, const uint32_t *pkts,
                       uint32_t n, uint64_t mac, uint32_t *keep)
{
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t idx = pkts[i];
        uint8_t h[ETH_HLEN];
        uint16_t etype;
        if (idx >= p->num_packets) {
            keep[k++] = i;  /* not ours to judge: Python words the error */
            continue;
        }
        if ((p->pkt_pflags[idx] & SK_PKT_VNET_HDR) &&
            (p->pkt_vnet[(size_t)idx * SW_VNET_STRIDE] & SW_VNET_F_NEEDS_CSUM)) {
            keep[k++] = i;
            continue;
        }
        if (head_of(p, b, idx, h) < ETH_HLEN)
            continue;  /* a runt: ignored */
        etype = (uint16_t)(h[12] << 8 | h[13]);
        if (etype == SW_ETH_P_ARP || (etype == SW_ETH_P_IP && mac_at(h) == mac))
            keep[k++] = i;
    }
    return k;
}
