/*
 * mydriver: the smallest useful virtio-net driver for the vdev sandbox, to copy and grow.
 *
 * Legacy virtio-pci (the I/O BAR of QEMU's transitional virtio-net-pci on pc / q35),
 * split rings (virtio 1.x 2.7) laid out the legacy way, polling, one RX and one TX
 * queue.  Every layout comes from vdev/abi/virtio.h, the header the vdev device reads
 * with cffi, so both ends agree by construction.
 *
 * The sandbox talks to it over COM1 with vdev's console protocol: a "vdev> " prompt,
 * and every reply ends with one "OK ..." or "ERR ..." line.  That is all `vdev sandbox
 * --script`, `host send/expect` and fault scenarios need.  Global integers are found by
 * `vdev inspect` through the ELF symbol table (guest-physical addresses: no paging).
 *
 * Commands: tx COUNT SIZE | rx COUNT [TIMEOUT_MS] | stats | quit CODE | help
 */
#include "virtio.h"

#define NULL ((void *)0)
#define QSIZE 256                        /* QEMU's default virtio-net queue size */
#define BUF 2048
#define HDR 10                           /* legacy struct virtio_net_hdr, no MRG_RXBUF */

/* ---- what `vdev inspect` shows (exported integers) ---- */
uint32_t my_tx_packets, my_rx_packets, my_tx_kicks, my_rx_bytes;

/* ---- port I/O and a tiny runtime ---- */
static inline void outb(uint16_t p, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(p)); }
static inline void outw(uint16_t p, uint16_t v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(p)); }
static inline void outl(uint16_t p, uint32_t v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(p)); }
static inline uint8_t inb(uint16_t p) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline uint16_t inw(uint16_t p) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline uint32_t inl(uint16_t p) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline uint64_t rdtsc(void) { uint32_t lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return (uint64_t)hi << 32 | lo; }
#define barrier() __asm__ volatile("" ::: "memory")
#define mb() __asm__ volatile("mfence" ::: "memory")

static void putc(char c)
{
    if (c == '\n')
        putc('\r');
    while (!(inb(0x3f8 + 5) & 0x20))
        ;
    outb(0x3f8, (uint8_t)c);
}

static void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

static void putu(uint32_t v)
{
    char b[11];
    int n = 0;
    do {
        b[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        putc(b[--n]);
}

static int getc(void) { return (inb(0x3f8 + 5) & 1) ? inb(0x3f8) : -1; }

static int streq(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

static int parse(const char *s, uint32_t *out)
{
    uint32_t v = 0;
    if (!s || !*s)
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        v = v * 10 + (uint32_t)(*s - '0');
    }
    *out = v;
    return 0;
}

/* TSC ticks per millisecond, measured against PIT channel 0 counting 5966 ticks (5 ms). */
static uint32_t tsc_ms = 1000000;

static void clock_init(void)
{
    outb(0x43, 0x34);
    outb(0x40, 0xff);
    outb(0x40, 0xff);
    outb(0x43, 0);
    uint16_t c0 = (uint16_t)(inb(0x40) | inb(0x40) << 8);
    uint64_t t0 = rdtsc();
    for (uint32_t i = 0; i < 2000000; i++) {
        outb(0x43, 0);
        uint16_t c = (uint16_t)(inb(0x40) | inb(0x40) << 8);
        if ((uint16_t)(c0 - c) >= 5966) {
            uint32_t per5 = (uint32_t)(rdtsc() - t0);  /* 5 ms fit 32 bits below 850 GHz */
            tsc_ms = per5 / 5 ? per5 / 5 : 1;
            return;
        }
    }
}

/* ---- PCI and the legacy virtio header (4.1.4.8) ---- */
static uint32_t pci_r32(uint32_t bdf, uint32_t off)
{
    outl(0xcf8, 0x80000000u | bdf << 8 | (off & 0xfc));
    return inl(0xcfc);
}

static void pci_w16(uint32_t bdf, uint32_t off, uint16_t v)
{
    outl(0xcf8, 0x80000000u | bdf << 8 | (off & 0xfc));
    outw((uint16_t)(0xcfc + (off & 2)), v);
}

static uint16_t io;                      /* BAR0: the legacy register block */

static int find_nic(void)
{
    for (uint32_t bdf = 0; bdf < 256 * 32 * 8; bdf += 8) {  /* function 0 of each slot */
        uint32_t id = pci_r32(bdf, 0);
        /* 4.1.2: 1af4:1000 with subsystem id 1 is a transitional network device. */
        if (id != 0x10001af4 || (pci_r32(bdf, 0x2c) >> 16) != 1)
            continue;
        uint32_t bar0 = pci_r32(bdf, 0x10);
        if (!(bar0 & 1))
            return -1;
        io = (uint16_t)(bar0 & ~3u);
        pci_w16(bdf, 4, (uint16_t)(pci_r32(bdf, 4) | 0x5));  /* I/O space, bus master */
        return 0;
    }
    return -1;
}

/* ---- one split queue, legacy layout (2.7.2: used ring 4096-aligned) ---- */
struct queue {
    uint16_t index, size, avail, last_used;
    struct vring_desc *desc;
    struct vring_avail_hdr *av;
    uint16_t *ring;
    struct vring_used_hdr *used;
    struct vring_used_elem *elem;
};

static uint8_t mem[2][16384] __attribute__((aligned(4096)));
/* Packet buffers need no zeroing: kept out of the .bss that start.S clears. */
static uint8_t bufs[2][QSIZE][BUF] __attribute__((aligned(16), section(".noinit")));
static struct queue rxq, txq;
static uint8_t mac[6];

static int queue_init(struct queue *q, uint16_t index)
{
    outw((uint16_t)(io + VIRTIO_PCI_QUEUE_SEL), index);
    uint16_t size = inw((uint16_t)(io + VIRTIO_PCI_QUEUE_NUM));
    if (size == 0 || size > QSIZE)
        return -1;
    uint8_t *m = mem[index];
    for (uint32_t i = 0; i < sizeof(mem[0]); i++)
        m[i] = 0;
    q->index = index;
    q->size = size;
    q->avail = q->last_used = 0;
    q->desc = (struct vring_desc *)m;
    q->av = (struct vring_avail_hdr *)(m + 16u * size);
    q->ring = (uint16_t *)(q->av + 1);
    q->used = (struct vring_used_hdr *)(m + ((16u * size + 6u + 2u * size + 4095u) & ~4095u));
    q->elem = (struct vring_used_elem *)(q->used + 1);
    q->av->flags = VRING_AVAIL_F_NO_INTERRUPT;   /* we poll */
    outl((uint16_t)(io + VIRTIO_PCI_QUEUE_PFN), (uint32_t)m >> 12);
    return 0;
}

/* Descriptor i is buffer i: post it, publish the avail idx (2.7.13), kick (2.7.13.4). */
static void post(struct queue *q, uint16_t i, uint32_t len, int writable)
{
    q->desc[i].addr = (uint32_t)bufs[q->index][i];
    q->desc[i].len = len;
    q->desc[i].flags = writable ? VRING_DESC_F_WRITE : 0;
    q->ring[q->avail % q->size] = i;
    barrier();
    q->av->idx = ++q->avail;
}

static void kick(struct queue *q)
{
    mb();
    if (!(((volatile struct vring_used_hdr *)q->used)->flags & VRING_USED_F_NO_NOTIFY)) {
        outw((uint16_t)(io + VIRTIO_PCI_QUEUE_NOTIFY), q->index);
        my_tx_kicks += q->index == 1;
    }
}

static int used(struct queue *q, uint32_t *id, uint32_t *len)
{
    if (((volatile struct vring_used_hdr *)q->used)->idx == q->last_used)
        return 0;
    barrier();
    struct vring_used_elem *e = &q->elem[q->last_used % q->size];
    *id = e->id;
    *len = e->len;
    q->last_used++;
    return *id < q->size;                /* never trust the device with an index */
}

static int nic_init(void)
{
    if (find_nic())
        return -1;
    /* 3.1.1 Device Initialization: reset, ACKNOWLEDGE, DRIVER, features, queues, DRIVER_OK. */
    outb((uint16_t)(io + VIRTIO_PCI_STATUS), 0);
    outb((uint16_t)(io + VIRTIO_PCI_STATUS), VIRTIO_STATUS_ACKNOWLEDGE);
    outb((uint16_t)(io + VIRTIO_PCI_STATUS), VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    uint32_t f = inl((uint16_t)(io + VIRTIO_PCI_HOST_FEATURES));
    outl((uint16_t)(io + VIRTIO_PCI_GUEST_FEATURES), f & (1u << VIRTIO_NET_F_MAC));
    if (queue_init(&rxq, 0) || queue_init(&txq, 1))
        return -2;
    for (uint16_t i = 0; i < rxq.size; i++)
        post(&rxq, i, BUF, 1);
    outb((uint16_t)(io + VIRTIO_PCI_STATUS),
         VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_DRIVER_OK);
    for (int i = 0; i < 6; i++)
        mac[i] = inb((uint16_t)(io + VIRTIO_PCI_CONFIG_NO_MSIX + i));
    kick(&rxq);
    return 0;
}

/* ---- commands ---- */

/* The vdev test frame: broadcast, our MAC, 0x88b5, "VDEV", seq, size, byte[o] = seq + o. */
static void cmd_tx(uint32_t count, uint32_t size)
{
    uint32_t sent = 0;
    uint16_t next = 0, in_flight = 0;
    while (sent < count || in_flight) {
        uint32_t id, len;
        while (used(&txq, &id, &len))
            in_flight--;
        if (sent < count && in_flight < txq.size) {
            uint8_t *b = bufs[1][next];
            for (uint32_t i = 0; i < HDR; i++)
                b[i] = 0;
            uint8_t *d = b + HDR;
            for (uint32_t o = 0; o < size; o++)
                d[o] = (uint8_t)(sent + o);
            for (int i = 0; i < 6; i++) {
                d[i] = 0xff;
                d[6 + i] = mac[i];
            }
            d[12] = 0x88, d[13] = 0xb5, d[14] = 'V', d[15] = 'D', d[16] = 'E', d[17] = 'V';
            for (int i = 0; i < 4; i++) {
                d[18 + i] = (uint8_t)(sent >> (8 * i));
                d[22 + i] = (uint8_t)(size >> (8 * i));
            }
            post(&txq, next, HDR + size, 0);
            kick(&txq);
            next = (uint16_t)((next + 1) % txq.size);
            in_flight++;
            sent++;
            my_tx_packets++;
        }
    }
    puts("OK tx sent=");
    putu(sent);
    puts("\n");
}

static void cmd_rx(uint32_t count, uint32_t timeout_ms)
{
    uint32_t got = 0, bytes = 0;
    uint64_t deadline = rdtsc() + (uint64_t)timeout_ms * tsc_ms;
    while (got < count && rdtsc() < deadline) {
        uint32_t id, len;
        if (!used(&rxq, &id, &len)) {
            (void)inb(0x3f8 + 5);        /* a device access lets QEMU's I/O thread run */
            continue;
        }
        if (len >= HDR) {
            got++;
            bytes += len - HDR;
            my_rx_packets++;
            my_rx_bytes += len - HDR;
        }
        post(&rxq, (uint16_t)id, BUF, 1);   /* recycle the buffer */
        kick(&rxq);
    }
    puts(got == count ? "OK rx received=" : "ERR rx timeout received=");
    putu(got);
    puts(" bytes=");
    putu(bytes);
    puts("\n");
}

static void handle(char *line)
{
    char *argv[4] = {NULL, NULL, NULL, NULL};
    int argc = 0;
    for (char *p = line; *p && argc < 4;) {
        while (*p == ' ')
            *p++ = 0;
        if (*p)
            argv[argc++] = p;
        while (*p && *p != ' ')
            p++;
    }
    uint32_t a = 0, b = 0;
    if (!argc)
        return;
    if (streq(argv[0], "tx") && !parse(argv[1], &a) && !parse(argv[2], &b) && b >= 26 && b <= BUF - HDR)
        cmd_tx(a, b);
    else if (streq(argv[0], "rx") && !parse(argv[1], &a))
        cmd_rx(a, argc > 2 && !parse(argv[2], &b) ? b : 5000);
    else if (streq(argv[0], "stats")) {
        puts("tx_packets=");
        putu(my_tx_packets);
        puts("\nrx_packets=");
        putu(my_rx_packets);
        puts("\nOK stats\n");
    } else if (streq(argv[0], "quit")) {
        if (argc < 2 || parse(argv[1], &a))
            a = 0;
        puts("OK quit code=");
        putu(a);
        puts("\n");
        outl(0xf4, a);                   /* isa-debug-exit: QEMU exits with (a << 1) | 1 */
    } else if (streq(argv[0], "help"))
        puts("tx COUNT SIZE | rx COUNT [TIMEOUT_MS] | stats | quit CODE\nOK help\n");
    else
        puts("ERR unknown command or bad arguments\n");
}

void main(void);
void main(void)
{
    outb(0x3f8 + 1, 0);                  /* COM1: no interrupts, 115200 8N1 */
    outb(0x3f8 + 3, 0x80);
    outb(0x3f8, 1);
    outb(0x3f8 + 1, 0);
    outb(0x3f8 + 3, 3);
    clock_init();
    puts(nic_init() ? "ERR no legacy virtio-net device\n" : "OK boot mydriver\n");
    static char line[256];
    uint32_t n = 0;
    puts("vdev> ");
    for (;;) {
        int c = getc();
        if (c < 0)
            continue;
        if (c == '\r' || c == '\n') {
            if (c == '\n' && n == 0)
                continue;                /* the LF of a CRLF */
            puts("\n");
            line[n] = 0;
            handle(line);
            n = 0;
            puts("vdev> ");
        } else if (c >= 0x20 && c < 0x7f && n + 1 < sizeof(line)) {
            line[n++] = (char)c;
            putc((char)c);
        }
    }
}
