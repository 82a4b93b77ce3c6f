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
#include "pool_md.h"

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

uint32_t sw_packet_head(const struct fp_pool *p, const struct sw_bufs *b, uint32_t idx,
                        uint8_t *out)
{
    return head_of(p, b, idx, out);
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


/* ---- the responder ------------------------------------------------------------------------
 *
 * Responder.answer, check for check (responder.py is the reference and the differential
 * tests hold the two together), written into the packet that carried the request.  The
 * reference frees the request and allocates the reply, and the pool's LIFO free list hands
 * it the same packet back; so an in-place reply leaves the pool exactly as the reference
 * does, once this function has done the free's redzone repair and the allocation's
 * metadata reset for it.  A reply is never longer than its request (options and Ethernet
 * padding are dropped), so it fits the request's buffer, written from offset 0. */

static inline uint16_t be16(const uint8_t *d)
{
    return (uint16_t)(d[0] << 8 | d[1]);
}

static inline void put16(uint8_t *d, uint32_t v)
{
    d[0] = (uint8_t)(v >> 8);
    d[1] = (uint8_t)v;
}

/* RFC 1071: 16-bit big-endian words (an odd byte padded with 0), not yet folded. */
static uint64_t sum_words(uint64_t acc, const uint8_t *d, uint32_t len)
{
    uint32_t i;
    for (i = 0; i + 1 < len; i += 2)
        acc += (uint32_t)d[i] << 8 | d[i + 1];
    if (len & 1)
        acc += (uint32_t)d[len - 1] << 8;
    return acc;
}

static uint32_t fold(uint64_t s)
{
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    return (uint32_t)s;
}

static int in_ports(const uint16_t *ports, uint32_t n, uint32_t port)
{
    for (uint32_t i = 0; i < n; i++)
        if (ports[i] == port)
            return 1;
    return 0;
}

static void put_mac(uint8_t *d, uint64_t mac)
{
    for (int i = 0; i < 6; i++)
        d[i] = (uint8_t)(mac >> (8 * (5 - i)));
}

static void put_ip(uint8_t *d, uint32_t ip)
{
    for (int i = 0; i < 4; i++)
        d[i] = (uint8_t)(ip >> (8 * (3 - i)));
}

/* Responder._ip_frame around the L4 payload already at out + 34 (plen bytes). */
static uint32_t ip_frame(uint8_t *out, const uint8_t *dst_mac, uint64_t mac, uint32_t ip,
                         const uint8_t *dst_ip, uint8_t proto, uint32_t plen)
{
    uint8_t *h = out + ETH_HLEN;
    memcpy(out, dst_mac, 6);
    put_mac(out + 6, mac);
    put16(out + 12, SW_ETH_P_IP);
    h[0] = 0x45;
    h[1] = 0;
    put16(h + 2, 20 + plen);
    put16(h + 4, 0);
    put16(h + 6, 0x4000);  /* DF */
    h[8] = 64;             /* TTL */
    h[9] = proto;
    put16(h + 10, 0);
    put_ip(h + 12, ip);
    memcpy(h + 16, dst_ip, 4);
    put16(h + 10, ~fold(sum_words(0, h, 20)) & 0xFFFF);
    return ETH_HLEN + 20 + plen;
}

/* One frame f[0..len) answered into out (the same buffer, out <= f): the reply's length, or
 * 0 when there is none (the counter that says why is bumped). */
static uint32_t answer(const uint8_t *f, uint32_t len, uint8_t *out, uint64_t mac, uint32_t ip,
                       const uint16_t *ports, uint32_t n_sink, uint32_t n_echo,
                       struct sw_resp *r)
{
    static const uint8_t arp_req[8] = {0, 1, 8, 0, 6, 4, 0, 1};
    uint8_t myip[4], src[6], peer[4];
    const uint8_t *iph, *l4;
    uint32_t ihl, total, plen;
    uint16_t etype;

    if (len < ETH_HLEN) {
        r->counts[SW_C_IGNORED]++;
        return 0;
    }
    put_ip(myip, ip);
    memcpy(src, f + 6, 6);
    etype = be16(f + 12);
    if (etype == SW_ETH_P_ARP) {
        uint8_t sha[6], spa[4];
        if (len < 42 || memcmp(f + 14, arp_req, 8) != 0 || memcmp(f + 38, myip, 4) != 0) {
            r->counts[SW_C_IGNORED]++;
            return 0;
        }
        memcpy(sha, f + 22, 6);
        memcpy(spa, f + 28, 4);
        r->counts[SW_C_ARP]++;
        memcpy(out, src, 6);
        put_mac(out + 6, mac);
        put16(out + 12, SW_ETH_P_ARP);
        memcpy(out + 14, arp_req, 7);
        out[21] = 2;  /* reply */
        put_mac(out + 22, mac);
        memcpy(out + 28, myip, 4);
        memcpy(out + 32, sha, 6);
        memcpy(out + 38, spa, 4);
        return 42;
    }
    if (etype != SW_ETH_P_IP || mac_at(f) != mac) {
        r->counts[SW_C_IGNORED]++;
        return 0;
    }
    iph = f + ETH_HLEN;
    if (len - ETH_HLEN < 20 || iph[0] >> 4 != 4) {
        r->counts[SW_C_IGNORED]++;
        return 0;
    }
    ihl = (uint32_t)(iph[0] & 0xF) * 4;
    total = be16(iph + 2);
    if (ihl < 20 || total < ihl || total > len - ETH_HLEN || memcmp(iph + 16, myip, 4) != 0) {
        r->counts[SW_C_IGNORED]++;
        return 0;
    }
    /* RFC 1122 3.2.1.2: a header whose checksum fails is discarded silently. */
    if (fold(sum_words(0, iph, ihl)) != 0xFFFF) {
        r->counts[SW_C_BAD_IP]++;
        return 0;
    }
    memcpy(peer, iph + 12, 4);
    l4 = iph + ihl;
    plen = total - ihl;
    if (iph[9] == 1 && plen >= 8) {  /* ICMP (RFC 792: the sum covers the whole message) */
        uint8_t *icmp = out + ETH_HLEN + 20;
        if (fold(sum_words(0, l4, plen)) != 0xFFFF) {
            r->counts[SW_C_BAD_ICMP]++;
            return 0;
        }
        if (l4[0] != 8) {
            r->counts[SW_C_IGNORED]++;
            return 0;
        }
        r->counts[SW_C_ICMP]++;
        memmove(icmp + 4, l4 + 4, plen - 4);
        memset(icmp, 0, 4);  /* type 0 (echo reply), code 0, checksum 0 while summed */
        put16(icmp + 2, ~fold(sum_words(0, icmp, plen)) & 0xFFFF);
        return ip_frame(out, src, mac, ip, peer, 1, plen);
    }
    if (iph[9] == 17 && plen >= 8) {  /* UDP */
        uint32_t sport = be16(l4), dport = be16(l4 + 2), ulen = be16(l4 + 4), seg, dlen;
        seg = (ulen >= 8 && ulen <= plen) ? ulen : plen;
        if (be16(l4 + 6) != 0) {  /* RFC 768: 0 is "no checksum" */
            uint8_t pseudo[12];
            memcpy(pseudo, peer, 4);
            memcpy(pseudo + 4, myip, 4);
            pseudo[8] = 0;
            pseudo[9] = 17;
            put16(pseudo + 10, seg);
            if (fold(sum_words(sum_words(0, pseudo, 12), l4, seg)) != 0xFFFF) {
                r->counts[SW_C_BAD_UDP]++;
                return 0;
            }
        }
        dlen = seg - 8;
        if (in_ports(ports, n_sink, dport)) {
            r->counts[SW_C_SINK]++;
            r->counts[SW_C_SINK_BYTES] += dlen;
            return 0;
        }
        if (in_ports(ports + n_sink, n_echo, dport)) {
            uint8_t *udp = out + ETH_HLEN + 20;
            r->counts[SW_C_UDP]++;
            memmove(udp + 8, l4 + 8, dlen);
            put16(udp, dport);
            put16(udp + 2, sport);
            put16(udp + 4, 8 + dlen);
            put16(udp + 6, 0);
            return ip_frame(out, src, mac, ip, peer, 17, 8 + dlen);
        }
    }
    r->counts[SW_C_IGNORED]++;
    return 0;
}

uint32_t sw_respond(const struct fp_pool *p, const struct sw_bufs *b, const uint32_t *pkts,
                    uint32_t n, uint64_t mac, uint32_t ip, const uint16_t *ports,
                    uint32_t n_sink, uint32_t n_echo, uint8_t *verdict, struct sw_resp *r)
{
    uint32_t i;
    memset(r, 0, sizeof(*r));
    for (i = 0; i < n; i++) {
        uint32_t idx = pkts[i], doff, dlen, rlen;
        uint8_t *base;
        struct sk_md_obj *o;
        /* What the reference would fault on, chain, complete or spread over buffers is its
         * own to do (and to word the error of). */
        if (idx >= p->num_packets || p->pkt_state[idx] != PKT_ALLOCATED ||
            p->pkt_owner[idx] != KERNEL_OWNER || p->b_next[idx] != SK_NO_INDEX ||
            p->b_large[idx] || p->b_buf[idx] >= p->num_packets + p->num_ext)
            break;
        if ((p->pkt_pflags[idx] & SK_PKT_VNET_HDR) &&
            (p->pkt_vnet[(size_t)idx * SW_VNET_STRIDE] & SW_VNET_F_NEEDS_CSUM))
            break;
        doff = p->b_doff[idx];
        dlen = p->b_dlen[idx];
        if (doff > p->buf_size || dlen > p->buf_size - doff)
            break;
        /* The data area is the arena's, writable; sw_bufs is const for the read-only users. */
        base = (uint8_t *)(uintptr_t)b->buf + (uint64_t)p->b_buf[idx] * p->buf_size;
        rlen = answer(base + doff, dlen, base, mac, ip, ports, n_sink, n_echo, r);
        if (rlen == 0) {
            verdict[i] = SW_R_DROP;
            continue;
        }
        verdict[i] = SW_R_REPLY;
        r->n_reply++;
        /* Pbufpool._release's redzone repair, then _init_packet and packet_from_bytes. */
        o = (struct sk_md_obj *)(p->md + (size_t)idx * sizeof(struct sk_md_obj));
        if (o->pre.redzone != (SK_REDZONE_SEED ^ (uint64_t)idx)) {
            r->redzone_faults++;
            o->pre.redzone = SK_REDZONE_SEED ^ (uint64_t)idx;
        }
        p->pkt_len[idx] = rlen;  /* pkt_nbufs stays 1: one buflet, no chain (above) */
        p->pkt_pflags[idx] = 0;
        p->pkt_l2[idx] = 0;
        p->pkt_cstart[idx] = 0;
        p->pkt_cstuff[idx] = 0;
        p->b_doff[idx] = 0;
        p->b_dlen[idx] = rlen;
    }
    r->done = i;
    return i;
}
