/*
 * Compiled forwarding decisions of vdev/net/switch.py (the Python reference): MAC learning
 * and FDB lookup for a whole burst, in packet order, so a frame learned early in a burst is
 * found by the frames after it exactly as the Python loop finds it.
 *
 * The FDB is an open-addressing table of 48-bit MACs -> endpoint ids owned by the Python
 * Switch (which keeps its dict view in step: it is told which packets changed an entry).
 */
#ifndef VDEV_NATIVE_SWITCH_H
#define VDEV_NATIVE_SWITCH_H

#include <stdint.h>

#include "fastpath.h"

/* FP-CDEF-BEGIN */
#define SW_FDB_SLOTS 8192      /* table size (power of 2); at most SW_FDB_MAX entries */
#define SW_FDB_MAX 6144
#define SW_FLOOD -1            /* dest[i]: broadcast, multicast or unknown unicast */
#define SW_SHORT -2            /* dest[i]: shorter than an Ethernet header: dropped */
#define SW_HAIRPIN -3          /* dest[i]: destination lives behind the sender: dropped */
#define SW_UNKNOWN -4          /* fdb value: a name the switch has no endpoint for (floods) */

#define SW_OK 0
#define SW_FDB_FULL 1          /* learning needed a new entry in a full table (nothing done) */

struct sw_fdb {
    uint64_t key[8192];        /* MAC | 1 << 63 when used, 0 when empty */
    int32_t val[8192];
    uint32_t count;
};

struct sw_bufs {
    const uint8_t *buf;        /* arena + buf_off */
    const uint8_t *large;      /* arena + large_buf_off */
};

struct sw_ret {
    uint32_t code;
    uint32_t n_special;        /* packets with dest < 0 */
    uint32_t n_learned;        /* entries in learned[] */
    uint32_t n_groups;         /* entries in groups[] (valid when n_special == 0) */
    uint64_t nbytes;           /* sum of the packets' lengths */
};

/* Decide every packet of pkts[0..n) sent by endpoint src: dest[i], lens[i]; learned[] = the
 * indices i whose source MAC made a new or moved FDB entry.  When no packet is special,
 * order[] holds pkts grouped by destination in order of first appearance, and groups[]
 * (dest, count) pairs. */
uint32_t sw_forward(const struct fp_pool *p, const struct sw_bufs *b, struct sw_fdb *fdb,
                    int32_t src, const uint32_t *pkts, uint32_t n, int32_t *dest, uint32_t *lens,
                    uint32_t *learned, uint32_t *order, int32_t *groups, struct sw_ret *r);

/* The responder (vdev/net/responder.py, the reference) for a burst: each packet it can
 * judge from trusted pool state alone (allocated, kernel-held, one small buflet, no
 * checksum left to complete) is answered in place or marked to be dropped, in order; the
 * first packet it cannot judge stops the burst (done < n) and is Python's. */
#define SW_ETH_P_ARP 0x0806
#define SW_ETH_P_IP 0x0800
#define SW_VNET_F_NEEDS_CSUM 1
#define SW_VNET_STRIDE 12      /* bytes of pkt_vnet per packet (arena.MdOff.VNET_LEN) */
#define SW_R_DROP 0            /* verdict[i]: free it (ignored, bad checksum or a sink) */
#define SW_R_REPLY 1           /* verdict[i]: the packet now holds its reply */

/* sw_resp.counts[]: the ResponderStats counters, in the dataclass's field order. */
#define SW_C_ARP 0
#define SW_C_ICMP 1
#define SW_C_UDP 2
#define SW_C_SINK 3
#define SW_C_SINK_BYTES 4
#define SW_C_IGNORED 5
#define SW_C_BAD_IP 6
#define SW_C_BAD_ICMP 7
#define SW_C_BAD_UDP 8
#define SW_NCOUNTS 9

struct sw_resp {
    uint32_t done;             /* packets judged: pkts[0..done) */
    uint32_t n_reply;
    uint32_t redzone_faults;   /* repaired in replied packets, as a free would */
    uint32_t _pad;
    uint64_t counts[9];        /* this call's ResponderStats increments (SW_C_*) */
};

/* ports[0..n_sink) are the UDP sink ports, ports[n_sink..n_sink + n_echo) the echo ports;
 * mac and ip are the responder's, as big-endian numbers. */
uint32_t sw_respond(const struct fp_pool *p, const struct sw_bufs *b, const uint32_t *pkts,
                    uint32_t n, uint64_t mac, uint32_t ip, const uint16_t *ports,
                    uint32_t n_sink, uint32_t n_echo, uint8_t *verdict, struct sw_resp *r);

int32_t sw_fdb_get(const struct sw_fdb *fdb, uint64_t mac);      /* SW_FLOOD if absent */
uint32_t sw_fdb_set(struct sw_fdb *fdb, uint64_t mac, int32_t v);  /* SW_OK / SW_FDB_FULL */
void sw_fdb_clear(struct sw_fdb *fdb);
/* FP-CDEF-END */

/* For other C files (vqecho.c): Pbufpool.packet_head(idx, 14) into out[14]; the bytes got. */
uint32_t sw_packet_head(const struct fp_pool *p, const struct sw_bufs *b, uint32_t idx,
                        uint8_t *out);

#endif /* VDEV_NATIVE_SWITCH_H */
