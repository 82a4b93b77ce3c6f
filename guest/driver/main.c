/*
 * kmain: boot, command line, and the serial command interpreter.
 *
 * Every command's reply ends with exactly one status line starting with
 * "OK " or "ERR "; everything before it is informational (key=value lines
 * for `stats`, "! ..." lines for violations).  Then the prompt "vdev> ".
 */
#include "driver.h"

#define ETHERTYPE_VDEV 0x88b5            /* IEEE local experimental */
#define MAX_ARGS 8

static uint64_t boot_tsc;
static uint8_t bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

static void put_mac(const uint8_t *m)
{
    kprintf("%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5]);
}

/* ---- command line: "key=value" words; others are ignored ---- */
static int opt_bool(const char *w, const char *key, int *out)
{
    size_t n = strlen(key);
    uint32_t v;
    if (memcmp(w, key, n) || w[n] != '=' || parse_uint(w + n + 1, &v) || v > 1)
        return 0;
    *out = (int)v;
    return 1;
}

/* QEMU microvm tells Linux where its transports are: "virtio_mmio.device=
 * 512@0xfeb00000:N"; take the line number N when the loader passes it. */
static int opt_mmio_device(const char *w)
{
    if (memcmp(w, "virtio_mmio.device=", 19))
        return 0;
    const char *c = w + 19;
    while (*c && *c != ':')
        c++;
    uint32_t v;
    if (*c == ':' && !parse_uint(c + 1, &v) && v < 48)
        irq_opts.mmio_irq = (int)v;
    return 1;
}

static int apply_opt(const char *w)
{
    uint32_t v;
    if (streq(w, "legacy"))
        net_opts.force = FORCE_LEGACY;
    else if (streq(w, "modern"))
        net_opts.force = FORCE_MODERN;
    else if (streq(w, "mmio"))
        net_opts.force = FORCE_MMIO;
    else if (!memcmp(w, "transport=", 10)) {
        w += 10;
        if (streq(w, "legacy"))
            net_opts.force = FORCE_LEGACY;
        else if (streq(w, "modern"))
            net_opts.force = FORCE_MODERN;
        else if (streq(w, "mmio"))
            net_opts.force = FORCE_MMIO;
        else if (streq(w, "auto"))
            net_opts.force = FORCE_AUTO;
        else
            return -1;
    } else if (opt_bool(w, "event_idx", &net_opts.event_idx) ||
               opt_bool(w, "mrg_rxbuf", &net_opts.mrg_rxbuf) ||
               opt_bool(w, "packed", &net_opts.packed) ||
               opt_bool(w, "indirect", &net_opts.indirect) || opt_bool(w, "csum", &net_opts.csum) ||
               opt_bool(w, "tso", &net_opts.tso) || opt_bool(w, "irq", &irq_opts.on) ||
               opt_bool(w, "msix", &irq_opts.msix) || opt_mmio_device(w))
        return 0;
    else if (!memcmp(w, "qsize=", 6) && !parse_uint(w + 6, &v) && v >= 2 && v <= VQ_MAX)
        net_opts.qsize = v;
    else if (!memcmp(w, "mq=", 3) && !parse_uint(w + 3, &v) && v >= 1 && v <= VDEV_MAX_PAIRS)
        net_opts.mq = v;
    else if (!memcmp(w, "irq_wd=", 7) && !parse_uint(w + 7, &v) && v >= 1 && v <= 60000)
        irq_opts.wd_ms = v;
    else if (!memcmp(w, "mmio_irq=", 9) && !parse_uint(w + 9, &v) && v < 48)
        irq_opts.mmio_irq = (int)v;
    else if (streq(w, "intx=pic"))
        irq_opts.ioapic = 0;
    else if (streq(w, "intx=ioapic"))
        irq_opts.ioapic = 1;
    else
        return -1;
    return 0;
}

static int split(char *s, char **argv)
{
    int n = 0;
    while (*s && n < MAX_ARGS) {
        while (*s == ' ' || *s == '\t')
            *s++ = 0;
        if (!*s)
            break;
        argv[n++] = s;
        while (*s && *s != ' ' && *s != '\t')
            s++;
    }
    while (*s == ' ' || *s == '\t')
        *s++ = 0;
    return n;
}

static char cmdline[512];

static void parse_boot_cmdline(uint32_t magic, uint32_t info)
{
    const char *src = NULL;
    if (magic == 0x2BADB002 && info) {
        /* Multiboot info: flags bit 2 => cmdline (physical address) at +16. */
        if (*(uint32_t *)(uintptr_t)info & 4)
            src = (const char *)(uintptr_t) * (uint32_t *)(uintptr_t)(info + 16);
    } else if (magic == 0x336ec578 && info && *(uint32_t *)(uintptr_t)info == 0x336ec578) {
        /* hvm_start_info: cmdline_paddr (u64) at +24. */
        src = (const char *)(uintptr_t) * (uint32_t *)(uintptr_t)(info + 24);
    }
    if (!src)
        return;
    size_t i = 0;
    for (; src[i] && i + 1 < sizeof(cmdline); i++)
        cmdline[i] = src[i];
    cmdline[i] = 0;
    char copy[512];
    memcpy(copy, cmdline, i + 1);
    char *argv[MAX_ARGS];
    int n = split(copy, argv);
    for (int k = 0; k < n; k++)
        apply_opt(argv[k]);
}

/* ---- frame pattern shared with the host tests ----
 * dst(6) src(6) type 0x88b5 | "VDEV" seq(le32) size(le32) | byte[o] = seq + o */
static uint8_t frame_byte(uint32_t o, uint32_t seq, uint32_t size, const uint8_t *dst)
{
    if (o < 6)
        return dst[o];
    if (o < 12)
        return vdev_info.mac[o - 6];
    if (o == 12)
        return ETHERTYPE_VDEV >> 8;
    if (o == 13)
        return ETHERTYPE_VDEV & 0xff;
    if (o < 18)
        return (uint8_t)"VDEV"[o - 14];
    if (o < 22)
        return (uint8_t)(seq >> (8 * (o - 18)));
    if (o < 26)
        return (uint8_t)(size >> (8 * (o - 22)));
    return (uint8_t)(seq + o);
}

/* Visit a packet's buflets (buf0, then the external chain), never more than
 * bufs_cnt of them, so a corrupted next_idx cannot loop us.  k counts. */
#define FOR_EACH_BUFLET(pk, bl, k)                                                      \
    for (struct sk_buflet *bl = &(pk)->buf0; bl && (k) < (pk)->bufs_cnt;               \
         bl = (++(k) < (pk)->bufs_cnt && bl->next_idx < POOL_BUFLETS) ? buflet_at(bl->next_idx) \
                                                                      : NULL)

static void fill_frame(uint32_t p, uint32_t size, uint32_t seq, const uint8_t *dst)
{
    struct sk_packet *pk = pkt_md(p);
    uint32_t off = 0, k = 0;
    FOR_EACH_BUFLET(pk, bl, k)
    {
        uint8_t *data = buf_addr(bl->buf_idx) + bl->doff;
        uint32_t room = bl->dlim - bl->doff, n = size - off < room ? size - off : room;
        for (uint32_t i = 0; i < n; i++)
            data[i] = frame_byte(off + i, seq, size, dst);
        bl->dlen = n;
        off += n;
    }
    sk_packet_finalize(p);
}

/* 1 if a pattern frame is intact, 0 if it is not ours, -1 if ours but bad. */
static int check_frame(uint32_t p)
{
    struct sk_packet *pk = pkt_md(p);
    uint8_t *d = sk_packet_data(p);
    if (pk->buf0.dlen < 26 || d[12] != (ETHERTYPE_VDEV >> 8) || d[13] != (ETHERTYPE_VDEV & 0xff) ||
        memcmp(d + 14, "VDEV", 4))
        return 0;
    uint32_t seq = (uint32_t)d[18] | (uint32_t)d[19] << 8 | (uint32_t)d[20] << 16 | (uint32_t)d[21] << 24;
    uint32_t size = (uint32_t)d[22] | (uint32_t)d[23] << 8 | (uint32_t)d[24] << 16 | (uint32_t)d[25] << 24;
    if (size != pk->len)
        return -1;
    uint32_t off = 0, k = 0;
    FOR_EACH_BUFLET(pk, bl, k)
    {
        const uint8_t *data = buf_addr(bl->buf_idx) + bl->doff;
        if (bl->buf_idx >= POOL_BUFS || bl->doff + bl->dlen > POOL_BUF_SIZE)
            return -1;
        for (uint32_t i = 0; i < bl->dlen; i++) {
            uint32_t o = off + i;
            if (o >= 26 && data[i] != (uint8_t)(seq + o))
                return -1;
        }
        off += bl->dlen;
    }
    return 1;
}

static int need_dev(void)
{
    if (!net_ready()) {
        kputs("ERR no device\n");
        return 0;
    }
    return 1;
}

static int arg_u32(int argc, char **argv, int i, uint32_t def, uint32_t *out)
{
    if (i >= argc) {
        *out = def;
        return 0;
    }
    return parse_uint(argv[i], out);
}

/* Split positional arguments from key=value options (after the verb). */
static int opts_split(int argc, char **argv, char **pos, char **kv, int *nkv)
{
    int np = 0;
    *nkv = 0;
    for (int i = 1; i < argc; i++) {
        const char *c = argv[i];
        while (*c && *c != '=')
            c++;
        if (*c == '=')
            kv[(*nkv)++] = argv[i];
        else
            pos[np++] = argv[i];
    }
    return np;
}

static int kv_u32(char **kv, int nkv, const char *key, uint32_t def, uint32_t *out)
{
    size_t n = strlen(key);
    *out = def;
    for (int i = 0; i < nkv; i++)
        if (!memcmp(kv[i], key, n) && kv[i][n] == '=')
            return parse_uint(kv[i] + n + 1, out);
    return 0;
}

static int kv_known(char **kv, int nkv, const char *const *keys)
{
    for (int i = 0; i < nkv; i++) {
        int ok = 0;
        for (const char *const *k = keys; *k; k++) {
            size_t n = strlen(*k);
            ok |= !memcmp(kv[i], *k, n) && kv[i][n] == '=';
        }
        if (!ok)
            return 0;
    }
    return 1;
}

/* Fill packets for `count` frames into the TX ring (batches of up to `batch`
 * slots per sync), then wait until the device used every chain.  `fill`
 * writes frame `seq` into packet p.  Returns 0, or prints the ERR line. */
typedef int (*fill_fn)(uint32_t p, uint32_t seq, void *ctx);

/* How long tx/txip/txhex wait for ring room and for the drain (ms); `tx ...
 * wait=MS` lowers it for one command (a fuzzer stalling TX need not wait 5 s). */
static uint32_t tx_wait_ms = 5000;

static int tx_frames(const char *verb, uint32_t count, uint32_t size, uint32_t batch, fill_fn fill,
                     void *ctx, uint64_t p0)
{
    struct sk_ring *r = vdev_tx_ring_p;
    uint32_t queued = 0, seq = 0;
    uint64_t stall = time_deadline(tx_wait_ms);
    while (queued < count) {
        uint32_t n = sk_available_slot_count(r);
        if (n > batch)
            n = batch;
        if (n > count - queued)
            n = count - queued;
        struct sk_slot *prev = NULL, *s;
        uint32_t done = 0;
        for (; done < n; done++) {
            s = sk_get_next_slot(r, prev);
            uint32_t p;
            if (!s || sk_packet_alloc(&p, size))
                break;
            if (fill(p, seq++, ctx)) {
                sk_packet_free(p);
                break;
            }
            sk_slot_attach_packet(r, s, p);
            prev = s;
        }
        if (prev)
            sk_advance_slot(r, prev);
        queued += done;
        int rc = sk_sync(r);
        if (rc == -1 && !net_ready()) {
            kprintf("ERR %s device lost\n", verb);
            return -1;
        }
        if (done) {
            stall = time_deadline(tx_wait_ms);
        } else if (time_expired(stall)) {
            kprintf("ERR %s stalled sent=%llu queued=%u\n", verb, vdev_stats.tx_packets - p0, queued);
            return -1;
        } else if (!sk_available_slot_count(r)) {
            net_wait(WAIT_TX, stall);    /* ring full: wait for completions */
        }
    }
    /* Drain: wait until the device has used every posted chain. */
    uint64_t dl = time_deadline(tx_wait_ms);
    while (sk_pending(r) || net_tx_in_flight()) {
        sk_sync(r);
        if (!sk_pending(r) && !net_tx_in_flight())
            break;
        if (time_expired(dl)) {
            kprintf("ERR %s drain timeout sent=%llu in_flight=%u\n", verb, vdev_stats.tx_packets - p0,
                    net_tx_in_flight());
            return -1;
        }
        net_wait(WAIT_TX, dl);
    }
    return 0;
}

struct pattern_ctx {
    uint32_t size, flows;
    uint8_t dst[6];
    int dst_given;
};

static int fill_pattern(uint32_t p, uint32_t seq, void *ctx)
{
    struct pattern_ctx *c = ctx;
    uint8_t dst[6];
    memcpy(dst, c->dst, 6);
    if (c->flows > 1 && !c->dst_given) {
        /* Flow f of `flows`: a locally administered unicast destination the
         * switch floods, so the TX queue choice (flow hash) varies. */
        static const uint8_t base[6] = {0x02, 0x00, 0x00, 0x00, 0x00, 0x00};
        memcpy(dst, base, 6);
        dst[5] = (uint8_t)(seq % c->flows);
        dst[4] = (uint8_t)((seq % c->flows) >> 8);
    }
    fill_frame(p, c->size, seq, dst);
    return 0;
}

/* tx COUNT SIZE [BATCH] [DSTMAC] [flows=K] [wait=MS] */
static void cmd_tx(int argc, char **argv)
{
    char *pos[MAX_ARGS], *kv[MAX_ARGS];
    int nkv, np = opts_split(argc, argv, pos, kv, &nkv);
    static const char *const keys[] = {"flows", "wait", NULL};
    struct pattern_ctx c;
    uint32_t count, batch, wait;
    memcpy(c.dst, bcast, 6);
    c.dst_given = np > 3;
    if (np < 2 || parse_uint(pos[0], &count) || parse_uint(pos[1], &c.size) ||
        arg_u32(np, pos, 2, 32, &batch) || (np > 3 && parse_mac(pos[3], c.dst)) ||
        !kv_known(kv, nkv, keys) || kv_u32(kv, nkv, "flows", 1, &c.flows) || c.flows == 0 ||
        kv_u32(kv, nkv, "wait", 5000, &wait) || wait == 0) {
        kputs("ERR usage: tx COUNT SIZE [BATCH] [DSTMAC] [flows=K] [wait=MS]\n");
        return;
    }
    uint32_t max_size = POOL_MAX_FRAGS * POOL_BUF_SIZE - POOL_HEADROOM;
    if (c.size < 14 || c.size > max_size || batch == 0) {
        kprintf("ERR tx bad size %u (14..%u) or batch %u\n", c.size, max_size, batch);
        return;
    }
    if (!need_dev())
        return;
    uint64_t p0 = vdev_stats.tx_packets, b0 = vdev_stats.tx_bytes;
    tx_wait_ms = wait;
    int rc = tx_frames("tx", count, c.size, batch, fill_pattern, &c, p0);
    tx_wait_ms = 5000;
    if (rc)
        return;
    kprintf("OK tx sent=%llu bytes=%llu\n", vdev_stats.tx_packets - p0, vdev_stats.tx_bytes - b0);
}

/* ---- IPv4 frames with checksum / segmentation offload ---- */
static const uint8_t ip_src[4] = {10, 0, 2, 15}, ip_dst[4] = {10, 0, 2, 99};

static uint32_t sum16(const uint8_t *p, uint32_t n, uint32_t sum)
{
    for (uint32_t i = 0; i + 1 < n; i += 2)
        sum += (uint32_t)p[i] << 8 | p[i + 1];
    if (n & 1)
        sum += (uint32_t)p[n - 1] << 8;
    return sum;
}

static uint16_t fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

struct ip_ctx {
    int tcp;
    uint32_t size, mss, flows;
};

/* dst broadcast, src our MAC, IPv4 10.0.2.15 -> 10.0.2.99, UDP or TCP from
 * port 5000 + flow to 9 (discard), payload byte[o] = (seq + o).  The L4
 * checksum field holds only the pseudo-header sum with NEEDS_CSUM set
 * (5.1.6.2): the kernel half hands it to the device (CSUM negotiated) or
 * finishes it itself.  mss < payload: one TSO frame (gso_type TCPV4). */
static int fill_ip(uint32_t p, uint32_t seq, void *ctx)
{
    struct ip_ctx *c = ctx;
    struct sk_packet *pk = pkt_md(p);
    uint32_t l4 = c->tcp ? 20 : 8, hl = 14 + 20 + l4;
    if (c->size < hl || c->size > POOL_BUF_SIZE - POOL_HEADROOM)
        return -1;
    uint8_t *d = sk_packet_data(p);
    memset(d, 0xff, 6);
    memcpy(d + 6, vdev_info.mac, 6);
    d[12] = 0x08;
    d[13] = 0x00;
    uint8_t *ip = d + 14, *t = ip + 20;
    uint32_t iplen = c->size - 14, l4len = iplen - 20;
    memset(ip, 0, 20 + l4);
    ip[0] = 0x45;
    ip[2] = (uint8_t)(iplen >> 8);
    ip[3] = (uint8_t)iplen;
    ip[4] = (uint8_t)(seq >> 8);
    ip[5] = (uint8_t)seq;
    ip[6] = 0x40;                        /* DF */
    ip[8] = 64;
    ip[9] = c->tcp ? 6 : 17;
    memcpy(ip + 12, ip_src, 4);
    memcpy(ip + 16, ip_dst, 4);
    uint16_t ipc = (uint16_t)~fold(sum16(ip, 20, 0));
    ip[10] = (uint8_t)(ipc >> 8);
    ip[11] = (uint8_t)ipc;
    uint16_t sport = (uint16_t)(5000 + seq % c->flows);
    t[0] = (uint8_t)(sport >> 8);
    t[1] = (uint8_t)sport;
    t[3] = 9;
    if (c->tcp) {
        t[4] = (uint8_t)(seq >> 24);     /* sequence number */
        t[5] = (uint8_t)(seq >> 16);
        t[6] = (uint8_t)(seq >> 8);
        t[7] = (uint8_t)seq;
        t[12] = 0x50;                    /* data offset 5 */
        t[13] = 0x18;                    /* PSH, ACK */
        t[14] = 0xff;
        t[15] = 0xff;
    } else {
        t[4] = (uint8_t)(l4len >> 8);
        t[5] = (uint8_t)l4len;
    }
    for (uint32_t o = hl; o < c->size; o++)
        d[o] = (uint8_t)(seq + o);
    /* Pseudo header: addresses, protocol, L4 length (RFC 768 / 793). */
    uint32_t ps = sum16(ip + 12, 8, 0) + (uint32_t)ip[9] + l4len;
    uint16_t part = fold(ps);
    uint32_t off = c->tcp ? 16 : 6;
    t[off] = (uint8_t)(part >> 8);
    t[off + 1] = (uint8_t)part;
    pk->buf0.dlen = c->size;
    memset(&pk->vnet, 0, sizeof(pk->vnet));
    pk->vnet.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    pk->vnet.csum_start = 34;
    pk->vnet.csum_offset = (uint16_t)off;
    if (c->tcp && c->mss && c->mss < c->size - hl) {
        pk->vnet.gso_type = VIRTIO_NET_HDR_GSO_TCPV4;
        pk->vnet.gso_size = (uint16_t)c->mss;
        pk->vnet.hdr_len = (uint16_t)hl;
    }
    pk->pflags |= SK_PKT_VNET_HDR;
    sk_packet_finalize(p);
    return 0;
}

/* txip udp|tcp COUNT SIZE [BATCH] [mss=N] [flows=K] */
static void cmd_txip(int argc, char **argv)
{
    char *pos[MAX_ARGS], *kv[MAX_ARGS];
    int nkv, np = opts_split(argc, argv, pos, kv, &nkv);
    static const char *const keys[] = {"mss", "flows", NULL};
    struct ip_ctx c;
    uint32_t count, batch;
    c.tcp = np > 0 && streq(pos[0], "tcp");
    if (np < 3 || (!c.tcp && !streq(pos[0], "udp")) || parse_uint(pos[1], &count) ||
        parse_uint(pos[2], &c.size) || arg_u32(np, pos, 3, 32, &batch) || batch == 0 ||
        !kv_known(kv, nkv, keys) || kv_u32(kv, nkv, "mss", 0, &c.mss) ||
        kv_u32(kv, nkv, "flows", 1, &c.flows) || c.flows == 0 || (c.mss && !c.tcp)) {
        kputs("ERR usage: txip udp|tcp COUNT SIZE [BATCH] [mss=N (tcp)] [flows=K]\n");
        return;
    }
    uint32_t hl = 14 + 20 + (c.tcp ? 20u : 8u), max = POOL_BUF_SIZE - POOL_HEADROOM;
    if (c.size < hl || c.size > max) {
        kprintf("ERR txip bad size %u (%u..%u)\n", c.size, hl, max);
        return;
    }
    if (!need_dev())
        return;
    uint64_t p0 = vdev_stats.tx_packets, b0 = vdev_stats.tx_bytes;
    uint64_t off0 = vdev_stats.tx_csum_offload, sw0 = vdev_stats.tx_csum_sw;
    uint64_t gso0 = vdev_stats.tx_gso, bad0 = vdev_stats.tx_gso_refused;
    if (tx_frames("txip", count, c.size, batch, fill_ip, &c, p0))
        return;
    uint64_t sent = vdev_stats.tx_packets - p0, refused = vdev_stats.tx_gso_refused - bad0;
    kprintf("%s txip sent=%llu bytes=%llu csum_offload=%llu csum_sw=%llu gso=%llu gso_refused=%llu\n",
            sent == count ? "OK" : "ERR", sent, vdev_stats.tx_bytes - b0,
            vdev_stats.tx_csum_offload - off0, vdev_stats.tx_csum_sw - sw0,
            vdev_stats.tx_gso - gso0, refused);
}

/* One informational line per frame: "frame len=N hex=..." (the first `limit` bytes). */
static void dump_frame(uint32_t p, uint32_t limit)
{
    struct sk_packet *pk = pkt_md(p);
    kprintf("frame len=%u hex=", pk->len);
    uint32_t shown = 0, k = 0;
    FOR_EACH_BUFLET(pk, bl, k)
    {
        const uint8_t *data = buf_addr(bl->buf_idx) + bl->doff;
        for (uint32_t i = 0; i < bl->dlen && shown < limit; i++, shown++)
            kprintf("%02x", data[i]);
    }
    kputs("\n");
}

/* txhex HEX [COUNT]: send an arbitrary frame (e.g. an ARP request built by a
 * test) COUNT times. */
static void cmd_txhex(int argc, char **argv)
{
    static uint8_t frame[POOL_BUF_SIZE];
    uint32_t count, n = 0;
    const char *h = argc > 1 ? argv[1] : "";
    while (h[0] && h[1] && n < POOL_BUF_SIZE - POOL_HEADROOM) {
        int hi = hexval(h[0]), lo = hexval(h[1]);
        if (hi < 0 || lo < 0)
            break;
        frame[n++] = (uint8_t)(hi << 4 | lo);
        h += 2;
    }
    if (argc < 2 || *h || n < 14 || arg_u32(argc, argv, 2, 1, &count)) {
        kputs("ERR usage: txhex HEX [COUNT] (14..2032 bytes)\n");
        return;
    }
    if (!need_dev())
        return;
    struct sk_ring *r = vdev_tx_ring_p;
    uint64_t p0 = vdev_stats.tx_packets, dl = time_deadline(5000);
    uint32_t queued = 0;
    while (queued < count && !time_expired(dl)) {
        struct sk_slot *s = sk_get_next_slot(r, NULL);
        uint32_t p;
        int progress = 0;
        if (s && sk_packet_alloc(&p, n) == 0) {
            memcpy(sk_packet_data(p), frame, n);
            pkt_md(p)->buf0.dlen = n;
            sk_packet_finalize(p);
            sk_slot_attach_packet(r, s, p);
            sk_advance_slot(r, s);
            queued++;
            progress = 1;
        }
        sk_sync(r);
        if (!progress)
            net_wait(WAIT_TX, dl);
    }
    while ((sk_pending(r) || net_tx_in_flight()) && !time_expired(dl)) {
        sk_sync(r);
        if (sk_pending(r) || net_tx_in_flight())
            net_wait(WAIT_TX, dl);
    }
    uint64_t sent = vdev_stats.tx_packets - p0;
    kprintf("%s txhex sent=%llu bytes=%llu\n", sent == count ? "OK" : "ERR", sent, sent * n);
}

/* rx COUNT [TIMEOUT_MS] [dump|full]: dump shows each frame's first 128 bytes, full all. */
static void cmd_rx(int argc, char **argv)
{
    uint32_t count, tmo;
    int full = argc > 3 && streq(argv[3], "full");
    int dump = full || (argc > 3 && streq(argv[3], "dump"));
    if (argc < 2 || arg_u32(argc, argv, 1, 0, &count) || arg_u32(argc, argv, 2, 5000, &tmo) ||
        (argc > 3 && !dump)) {
        kputs("ERR usage: rx COUNT [TIMEOUT_MS] [dump|full]\n");
        return;
    }
    if (!need_dev())
        return;
    struct sk_ring *r = vdev_rx_ring_p;
    uint32_t got = 0, bad = 0, ours = 0, minl = 0xffffffffu, maxl = 0;
    uint64_t bytes = 0, dl = time_deadline(tmo);
    while (got < count) {
        sk_sync(r);
        struct sk_slot *prev = NULL, *s;
        while (got < count && (s = sk_get_next_slot(r, prev)) != NULL) {
            uint32_t p = sk_slot_get_packet(r, s);
            if (p != SK_NO_INDEX) {
                uint32_t len = pkt_md(p)->len;
                int c = check_frame(p);
                if (dump)
                    dump_frame(p, full ? 0xffffffffu : 128);
                ours += c != 0;
                bad += c < 0;
                bytes += len;
                minl = len < minl ? len : minl;
                maxl = len > maxl ? len : maxl;
                got++;
            }
            prev = s;
        }
        if (prev)
            sk_advance_slot(r, prev);
        if (got < count && time_expired(dl))
            break;
        if (got < count && !prev)
            net_wait(WAIT_RX, dl);
    }
    sk_sync(r);                          /* release what we consumed */
    if (!got)
        minl = 0;
    kprintf("%s rx %sreceived=%u bytes=%llu pattern=%u bad=%u min=%u max=%u\n",
            got == count ? "OK" : "ERR", got == count ? "" : "timeout ", got, bytes, ours, bad,
            minl, maxl);
}

/* echo [COUNT] [TIMEOUT_MS]: zero-copy reflect (RX slot -> TX slot), MACs swapped. */
static void cmd_echo(int argc, char **argv)
{
    uint32_t count, tmo;
    if (arg_u32(argc, argv, 1, 0, &count) || arg_u32(argc, argv, 2, count ? 10000 : 0, &tmo)) {
        kputs("ERR usage: echo [COUNT] [TIMEOUT_MS]\n");
        return;
    }
    if (!need_dev())
        return;
    struct sk_ring *rx = vdev_rx_ring_p, *tx = vdev_tx_ring_p;
    uint32_t echoed = 0;
    uint64_t bytes = 0, dl = time_deadline(tmo);
    const char *why = "count";
    int idle = 0, tx_full = 0;
    for (;;) {
        if (count && echoed >= count)
            break;
        if (tmo && time_expired(dl)) {
            why = "timeout";
            break;
        }
        if (!count && serial_getc() >= 0) {
            why = "key";
            break;
        }
        if (idle) {
            uint32_t what = WAIT_RX | (count ? 0 : WAIT_KEY) | (tx_full ? WAIT_TX : 0);
            if (net_wait(what, tmo ? dl : 0) == 2)
                continue;                /* a key: seen at the top */
        }
        sk_sync(rx);
        struct sk_slot *prev = NULL, *s, *tprev = NULL;
        while ((!count || echoed < count) && (s = sk_get_next_slot(rx, prev)) != NULL) {
            struct sk_slot *ts = sk_get_next_slot(tx, tprev);
            if (!ts)
                break;                   /* TX ring full: leave the rest for later */
            uint32_t p = sk_slot_detach_packet(rx, s);
            prev = s;
            if (p == SK_NO_INDEX)
                continue;
            uint8_t *d = sk_packet_data(p), tmp[6];
            if (pkt_md(p)->buf0.dlen >= 12) {
                memcpy(tmp, d, 6);
                memcpy(d, d + 6, 6);
                memcpy(d + 6, tmp, 6);
            }
            /* A partial checksum (GUEST_CSUM) goes back out as one (the MACs
             * are not covered): the kernel half offloads or finishes it. */
            if (pkt_md(p)->vnet.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
                pkt_md(p)->vnet.gso_type = VIRTIO_NET_HDR_GSO_NONE;
                pkt_md(p)->vnet.num_buffers = 0;
            } else {
                pkt_md(p)->pflags &= (uint16_t)~SK_PKT_VNET_HDR;
            }
            bytes += pkt_md(p)->len;
            if (sk_slot_attach_packet(tx, ts, p)) {
                sk_packet_free(p);
                continue;
            }
            tprev = ts;
            echoed++;
        }
        tx_full = (prev == NULL && sk_get_next_slot(rx, NULL) != NULL);
        idle = prev == NULL;
        if (prev)
            sk_advance_slot(rx, prev);
        if (tprev)
            sk_advance_slot(tx, tprev);
        sk_sync(tx);
    }
    uint64_t d2 = time_deadline(2000);
    while ((sk_pending(tx) || net_tx_in_flight()) && !time_expired(d2)) {
        sk_sync(tx);
        if (sk_pending(tx) || net_tx_in_flight())
            net_wait(WAIT_TX, d2);
    }
    sk_sync(rx);
    kprintf("%s echo %sechoed=%u bytes=%llu stop=%s\n", (count && echoed < count) ? "ERR" : "OK",
            (count && echoed < count) ? "timeout " : "", echoed, bytes, why);
}

#define STAT(name) kprintf(#name "=%llu\n", (uint64_t)vdev_stats.name)
static void cmd_stats(void)
{
    pool_update_gauges();
    STAT(tx_packets);
    STAT(tx_bytes);
    STAT(tx_completions);
    STAT(tx_syncs);
    STAT(tx_kicks);
    STAT(tx_kicks_suppressed);
    STAT(tx_bad_packets);
    STAT(tx_ring_full);
    STAT(rx_packets);
    STAT(rx_bytes);
    STAT(rx_buffers);
    STAT(rx_syncs);
    STAT(rx_kicks);
    STAT(rx_kicks_suppressed);
    STAT(rx_refills);
    STAT(rx_dropped);
    STAT(alloc_failures);
    STAT(alloc_syncs);
    STAT(free_syncs);
    STAT(free_bad);
    STAT(resets);
    STAT(recoveries);
    STAT(viol_used_id_range);
    STAT(viol_used_id_not_outstanding);
    STAT(viol_used_len);
    STAT(viol_double_completion);
    STAT(viol_used_idx_jump);
    STAT(viol_num_buffers);
    STAT(viol_device_needs_reset);
    STAT(violations);
    STAT(pool_packets_in_use);
    STAT(pool_buflets_in_use);
    STAT(pool_bufs_in_use);
    STAT(irq_total);
    STAT(irq_queue);
    STAT(irq_config);
    STAT(irq_spurious);
    STAT(irq_unarmed);
    STAT(irq_isr_zero);
    STAT(irq_lost);
    STAT(rx_irqs);
    STAT(tx_irqs);
    STAT(link_changes);
    STAT(link_up);
    STAT(ctrl_cmds);
    STAT(ctrl_errors);
    STAT(tx_csum_offload);
    STAT(tx_csum_sw);
    STAT(tx_gso);
    STAT(tx_gso_refused);
    STAT(tx_indirect);
    STAT(rx_csum_partial);
    STAT(rx_csum_valid);
    STAT(rx_gso);
    kprintf("tx_ring_head=%u tx_ring_khead=%u tx_ring_tail=%u rx_ring_head=%u rx_ring_khead=%u rx_ring_tail=%u\n",
            vdev_tx_ring_p->ring_head, vdev_tx_ring_p->ring_khead, vdev_tx_ring_p->ring_tail,
            vdev_rx_ring_p->ring_head, vdev_rx_ring_p->ring_khead, vdev_rx_ring_p->ring_tail);
    kprintf("alloc_ring_ready=%u free_ring_pending=%u\n", sk_available_slot_count(vdev_alloc_ring_p),
            (vdev_free_ring_p->ring_head - vdev_free_ring_p->ring_khead + vdev_free_ring_p->ring_num_slots) %
                vdev_free_ring_p->ring_num_slots);
    kprintf("OK stats tx_packets=%llu rx_packets=%llu violations=%llu\n", vdev_stats.tx_packets,
            vdev_stats.rx_packets, vdev_stats.violations);
}

static const char *irq_mode_name(void)
{
    static const char *const names[] = {"poll", "intx-pic", "intx-ioapic", "msix"};
    return vdev_info.irq_mode < 4 ? names[vdev_info.irq_mode] : "?";
}

static void print_features_line(const char *what)
{
    kprintf("OK %s transport=%s device=0x%llx driver=0x%llx event_idx=%u mrg_rxbuf=%u hdr_len=%u "
            "rx_qsize=%u tx_qsize=%u packed=%u indirect=%u csum=%u tso=%u mq=%u max_pairs=%u "
            "irq=%s irq_line=%u mac=",
            what, vt_name(), vdev_info.device_features, vdev_info.driver_features,
            (uint32_t)(vdev_info.driver_features >> VIRTIO_RING_F_EVENT_IDX) & 1,
            (uint32_t)(vdev_info.driver_features >> VIRTIO_NET_F_MRG_RXBUF) & 1, vdev_info.hdr_len,
            vdev_info.rx_qsize, vdev_info.tx_qsize, vdev_info.packed, vdev_info.indirect,
            vdev_info.csum, vdev_info.tso, vdev_info.pairs, vdev_info.max_pairs, irq_mode_name(),
            vdev_info.irq_line);
    put_mac(vdev_info.mac);
    kputs("\n");
}

/* features [event_idx=0|1] [mrg_rxbuf=0|1] [qsize=N]: renegotiates on change. */
static void cmd_features(int argc, char **argv)
{
    int force = net_opts.force;
    for (int i = 1; i < argc; i++) {
        if (apply_opt(argv[i])) {
            kprintf("ERR features bad option '%s'\n", argv[i]);
            return;
        }
    }
    if (net_opts.force != force) {
        kputs("ERR features transport can only be chosen at boot\n");
        net_opts.force = force;
        return;
    }
    vdev_info.event_idx = (uint32_t)net_opts.event_idx;
    vdev_info.mrg_rxbuf = (uint32_t)net_opts.mrg_rxbuf;
    if (argc > 1 && net_restart(0)) {
        kputs("ERR features renegotiation failed\n");
        return;
    }
    if (!need_dev())
        return;
    print_features_line("features");
}

/* inject KIND: play a misbehaving device by writing a bogus used entry into
 * the RX used ring (only safe while no frames are arriving), so recovery can
 * be tested against a well-behaved backend.  The next sync must detect it,
 * count it by name and reset the device. */
static void cmd_inject(int argc, char **argv)
{
    struct vq *q = &vdev_rxq;
    if (argc < 2) {
        kputs("ERR usage: inject id_range|not_outstanding|len|double|jump|num_buffers\n");
        return;
    }
    if (!need_dev())
        return;
    if (q->packed) {
        kputs("ERR inject writes split-ring used entries; packed rings are on\n");
        return;
    }
    uint16_t idx = q->used->idx, size = q->size;
    uint32_t id = 0, len = 64;
    /* A posted head on the RX queue: every buffer there is one descriptor. */
    for (uint32_t i = 0; i < size; i++)
        if (q->state[i] == DS_POSTED) {
            id = i;
            break;
        }
    int n = 1;
    struct sk_ring *ring = vdev_rx_ring_p;
    /* The first entry must look like a sane frame so the later check fires. */
    struct virtio_net_hdr_mrg *h = (struct virtio_net_hdr_mrg *)buf_addr(q->token[id]);
    memset(h, 0, sizeof(*h));
    h->num_buffers = 1;
    if (streq(argv[1], "id_range"))
        id = size + 7u;
    else if (streq(argv[1], "len"))
        len = POOL_BUF_SIZE + 1;
    else if (streq(argv[1], "double"))
        n = 2;
    else if (streq(argv[1], "jump"))
        n = q->in_flight + 1 > 0xffff ? 0xffff : q->in_flight + 1;
    else if (streq(argv[1], "num_buffers"))
        h->num_buffers = 200;
    else if (streq(argv[1], "not_outstanding")) {
        /* On the TX queue: add one chain without publishing it (the device
         * never sees it, so in_flight is 1 deterministically), then complete
         * a descriptor that was never posted. */
        uint32_t p;
        q = &vdev_txq;
        ring = vdev_tx_ring_p;
        size = q->size;
        idx = q->used->idx;
        if (sk_packet_alloc(&p, 60)) {
            kputs("ERR inject no packet\n");
            return;
        }
        struct vq_seg seg = {(uint32_t)(uintptr_t)sk_packet_data(p), 60, 0};
        if (vq_add(q, &seg, 1, p) < 0) {
            sk_packet_free(p);
            kputs("ERR inject txq full\n");
            return;
        }
        id = q->free_head;
        len = 0;
    } else {
        kprintf("ERR inject unknown kind '%s'\n", argv[1]);
        return;
    }
    for (int k = 0; k < n && k < 2; k++) {
        q->used_ring[(uint16_t)(idx + k) % size].id = id;
        q->used_ring[(uint16_t)(idx + k) % size].len = len;
    }
    barrier();
    q->used->idx = (uint16_t)(idx + n);
    uint64_t v0 = vdev_stats.violations, r0 = vdev_stats.recoveries;
    sk_sync(ring);
    kprintf("%s inject kind=%s violations=%llu recoveries=%llu\n",
            vdev_stats.violations > v0 && vdev_stats.recoveries > r0 && net_ready() ? "OK" : "ERR",
            argv[1], vdev_stats.violations - v0, vdev_stats.recoveries - r0);
}

/* pool COUNT [SIZE]: take COUNT packets from the alloc ring (syncing it as it
 * runs dry), then give them all back through the free ring (syncing it as it
 * fills).  Exercises the user-packet-pool rings and shows nothing leaks. */
static void cmd_pool(int argc, char **argv)
{
    static uint32_t held[POOL_PACKETS];
    uint32_t count, size;
    if (argc < 2 || arg_u32(argc, argv, 1, 0, &count) || arg_u32(argc, argv, 2, 0, &size) ||
        count > POOL_PACKETS) {
        kprintf("ERR usage: pool COUNT [SIZE] (COUNT <= %u)\n", POOL_PACKETS);
        return;
    }
    if (!need_dev())
        return;
    uint32_t got = 0, freed = 0;
    while (got < count && sk_packet_alloc(&held[got], size) == 0)
        got++;
    pool_update_gauges();
    uint64_t peak = vdev_stats.pool_packets_in_use;
    for (uint32_t i = 0; i < got; i++)
        freed += sk_packet_free(held[i]) == 0;
    sk_sync(vdev_free_ring_p);
    pool_update_gauges();
    kprintf("%s pool allocated=%u freed=%u peak_in_use=%llu in_use=%llu alloc_ring_ready=%u\n",
            got == count && freed == got ? "OK" : "ERR", got, freed, peak,
            vdev_stats.pool_packets_in_use, sk_available_slot_count(vdev_alloc_ring_p));
}

/* One line per virtqueue; the control queue and pairs > 0 first, so that
 * pair 0's TX line (the keys most callers read) comes last. */
static void vq_line(const char *name, uint32_t pair, struct vq *q)
{
    struct vdev_vq_info *i = q->info;
    if (!q->size || !i)
        return;
    kprintf("%s%u vq=%u size=%u packed=%u avail_idx=%u last_used=%u in_flight=%u num_free=%u "
            "armed=%u broken=%u posted=%llu completed=%llu kicks=%llu irqs=%llu irq_lost=%llu "
            "packets=%llu msix_vector=%u",
            name, pair, q->index, q->size, (uint32_t)q->packed, i->avail_idx, i->last_used,
            q->in_flight, q->num_free, (uint32_t)q->armed, (uint32_t)q->broken, i->posted,
            i->completed, i->kicks, i->irqs, i->irq_lost, i->packets, i->msix_vector);
    if (q->packed)
        kprintf(" drv_event_flags=%u dev_event_flags=%u dev_event_off_wrap=%u\n",
                q->drv_event->flags, q->dev_event->flags, q->dev_event->off_wrap);
    else
        kprintf(" used_idx=%u used_flags=%u avail_flags=%u avail_event=%u used_event=%u\n",
                q->used->idx, q->used->flags, q->avail->flags, *q->avail_event, *q->used_event);
}

static void cmd_vq(void)
{
    if (!need_dev())
        return;
    if (vdev_ctrlq.size)
        vq_line("ctrlq", 0, &vdev_ctrlq);
    for (uint32_t p = net_pairs(); p-- > 0;) {
        vq_line("rxq", p, &vdev_rxqs[p]);
        vq_line("txq", p, &vdev_txqs[p]);
    }
    kputs("OK vq\n");
}

/* irq: what the interrupt side has seen (and the mode it runs in). */
static void cmd_irq(void)
{
    kprintf("OK irq mode=%s line=%u wd_ms=%u total=%llu queue=%llu config=%llu rx=%llu tx=%llu "
            "spurious=%llu unarmed=%llu isr_zero=%llu lost=%llu ticks=%llu halts=%llu\n",
            irq_mode_name(), vdev_info.irq_line, irq_opts.wd_ms, vdev_stats.irq_total,
            vdev_stats.irq_queue, vdev_stats.irq_config, vdev_stats.rx_irqs, vdev_stats.tx_irqs,
            vdev_stats.irq_spurious, vdev_stats.irq_unarmed, vdev_stats.irq_isr_zero,
            vdev_stats.irq_lost, vdev_ticks, vdev_halts);
}

/* link [up|down [TIMEOUT_MS]]: the link state the config interrupts reported;
 * with up/down, wait (halted) until it is that. */
static void cmd_link(int argc, char **argv)
{
    uint32_t tmo = 5000;
    int want = -1;
    if (argc > 1) {
        if (streq(argv[1], "up"))
            want = 1;
        else if (streq(argv[1], "down"))
            want = 0;
    }
    if ((argc > 1 && want < 0) || arg_u32(argc, argv, 2, 5000, &tmo) || argc > 3) {
        kputs("ERR usage: link [up|down [TIMEOUT_MS]]\n");
        return;
    }
    if (!need_dev())
        return;
    uint64_t dl = time_deadline(tmo);
    while (want >= 0 && (int)vdev_stats.link_up != want && !time_expired(dl)) {
        if (!irq_enabled()) {
            kputs("ERR link wait needs interrupts (irq=1): config changes arrive as interrupts\n");
            return;
        }
        net_wait(0, dl);
        net_poll_events();
    }
    int ok = want < 0 || (int)vdev_stats.link_up == want;
    kprintf("%s link %sup=%llu changes=%llu config_irqs=%llu\n", ok ? "OK" : "ERR",
            ok ? "" : "timeout ", vdev_stats.link_up, vdev_stats.link_changes, vdev_stats.irq_config);
}

static void handle(char *line)
{
    char *argv[MAX_ARGS];
    int argc = split(line, argv);
    if (argc == 0)
        return;
    net_poll_events();
    if (streq(argv[0], "tx"))
        cmd_tx(argc, argv);
    else if (streq(argv[0], "rx"))
        cmd_rx(argc, argv);
    else if (streq(argv[0], "echo"))
        cmd_echo(argc, argv);
    else if (streq(argv[0], "stats"))
        cmd_stats();
    else if (streq(argv[0], "features"))
        cmd_features(argc, argv);
    else if (streq(argv[0], "txhex"))
        cmd_txhex(argc, argv);
    else if (streq(argv[0], "pool"))
        cmd_pool(argc, argv);
    else if (streq(argv[0], "inject"))
        cmd_inject(argc, argv);
    else if (streq(argv[0], "txip"))
        cmd_txip(argc, argv);
    else if (streq(argv[0], "vq"))
        cmd_vq();
    else if (streq(argv[0], "irq"))
        cmd_irq();
    else if (streq(argv[0], "link"))
        cmd_link(argc, argv);
    else if (streq(argv[0], "reset")) {
        if (net_restart(0))
            kputs("ERR reset failed\n");
        else
            kprintf("OK reset resets=%llu\n", vdev_stats.resets);
    } else if (streq(argv[0], "quit")) {
        uint32_t code = 0;
        if (argc > 1 && parse_uint(argv[1], &code)) {
            kputs("ERR usage: quit CODE\n");
            return;
        }
        kprintf("OK quit code=%u\n", code);
        debug_exit(code);
    } else if (streq(argv[0], "help")) {
        kputs("tx COUNT SIZE [BATCH] [DSTMAC] [flows=K] [wait=MS] | txhex HEX [COUNT] | rx COUNT [TIMEOUT_MS] [dump|full]\n"
              "txip udp|tcp COUNT SIZE [BATCH] [mss=N] [flows=K] | echo [COUNT] [TIMEOUT_MS]\n"
              "stats | irq | link [up|down [TIMEOUT_MS]] | vq | reset | quit CODE\n"
              "features [event_idx=0|1] [mrg_rxbuf=0|1] [qsize=N] [packed=0|1] [mq=N] [indirect=0|1]\n"
              "         [csum=0|1] [tso=0|1] [irq=0|1] [msix=0|1] [intx=pic|ioapic] [irq_wd=MS]\n"
              "pool COUNT [SIZE] | inject id_range|not_outstanding|len|double|jump|num_buffers\n");
        kputs("OK help\n");
    } else {
        kprintf("ERR unknown command '%s'\n", argv[0]);
    }
    net_wait_done();
}

void kmain(uint32_t magic, uint32_t info);
void kmain(uint32_t magic, uint32_t info)
{
    boot_tsc = rdtsc();
    serial_init();
    timer_init();
    parse_boot_cmdline(magic, info);
    vdev_info.event_idx = (uint32_t)net_opts.event_idx;
    vdev_info.mrg_rxbuf = (uint32_t)net_opts.mrg_rxbuf;
    vdev_info.tsc_per_ms = tsc_per_ms;
    kprintf("vdev-bare: boot=%s cmdline='%s'\n", magic == 0x2BADB002 ? "multiboot" : "pvh", cmdline);
    irq_init();
    int rc = net_init();
    if (rc)
        kprintf("ERR no usable virtio-net device (rc=%d)\n", rc);
    else
        print_features_line("boot");
    vdev_info.boot_ms = time_since_ms(boot_tsc);
    kprintf("boot_ms=%u tsc_per_ms=%u\n", vdev_info.boot_ms, tsc_per_ms);

    static char line[4200];
    uint32_t len = 0;
    int last_cr = 0;
    kputs("vdev> ");
    for (;;) {
        int c = serial_getc();
        if (c < 0) {
            irq_idle();                  /* hlt until COM1, the tick or the NIC interrupts */
            continue;
        }
        if (c == '\n' && last_cr) {
            last_cr = 0;
            continue;                    /* CRLF: the CR already ended the line */
        }
        last_cr = c == '\r';
        if (c == '\r' || c == '\n') {
            kputs("\n");
            line[len] = 0;
            handle(line);
            len = 0;
            kputs("vdev> ");
        } else if (c == 0x7f || c == 0x08) {
            if (len) {
                len--;
                kputs("\b \b");
            }
        } else if (c >= 0x20 && c < 0x7f && len + 1 < sizeof(line)) {
            line[len++] = (char)c;
            serial_putc((char)c);
        }
    }
}
