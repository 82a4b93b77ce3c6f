/*
 * virtio transports: PCI legacy (I/O BAR0), PCI modern (vendor capabilities),
 * and virtio-mmio (v1 legacy and v2).  Only one device is driven at a time.
 */
#include "driver.h"

enum { T_NONE, T_LEGACY, T_MODERN, T_MMIO1, T_MMIO2 };

static struct {
    int kind;
    uint8_t bus, dev, fn;
    uint16_t io;                         /* legacy I/O BAR0 */
    uintptr_t common, isr, devcfg, notify;
    uint32_t notify_mult;
    uintptr_t mmio;
    uint16_t notify_off[VDEV_MAX_VQS];
    uint8_t msix_cap;                    /* config offset of the MSI-X capability, 0: none */
    int msix_on;
} t;

/* ---- PCI configuration mechanism #1 (ports 0xCF8/0xCFC) ---- */
static uint32_t pci_addr(int b, int d, int f, int off)
{
    return 0x80000000u | (uint32_t)b << 16 | (uint32_t)d << 11 | (uint32_t)f << 8 | (uint32_t)(off & 0xfc);
}

static uint32_t pci_r32(int b, int d, int f, int off)
{
    outl(0xcf8, pci_addr(b, d, f, off));
    return inl(0xcfc);
}

static uint8_t pci_r8(int b, int d, int f, int off)
{
    return (uint8_t)(pci_r32(b, d, f, off) >> ((off & 3) * 8));
}

static uint16_t pci_r16(int b, int d, int f, int off)
{
    return (uint16_t)(pci_r32(b, d, f, off) >> ((off & 2) * 8));
}

static void pci_w16(int b, int d, int f, int off, uint16_t v)
{
    outl(0xcf8, pci_addr(b, d, f, off));
    outw((uint16_t)(0xcfc + (off & 2)), v);
}

/* Memory BAR address, or 0 when the BAR is I/O, unassigned or above 4 GiB
 * (we run without paging, so only the low 4 GiB is reachable). */
static uintptr_t pci_mem_bar(int b, int d, int f, int bar)
{
    uint32_t lo = pci_r32(b, d, f, 0x10 + 4 * bar);
    if (lo & 1)
        return 0;
    if (((lo >> 1) & 3) == 2 && bar < 5 && pci_r32(b, d, f, 0x10 + 4 * (bar + 1)) != 0)
        return 0;
    return lo & ~0xfu;
}

/* 4.1.4 Virtio Structure PCI Capabilities: find common/notify/isr/device cfg. */
static int pci_modern_caps(int b, int d, int f)
{
    if (!(pci_r16(b, d, f, 0x06) & 0x10))
        return -1;                       /* no capability list */
    int off = pci_r8(b, d, f, 0x34) & 0xfc, guard = 48;
    t.common = t.isr = t.devcfg = t.notify = 0;
    while (off && guard--) {
        uint8_t id = pci_r8(b, d, f, off), type = pci_r8(b, d, f, off + 3);
        if (id == 0x11 && !t.msix_cap)
            t.msix_cap = (uint8_t)off;   /* MSI-X (PCI 3.0 6.8.2) */
        if (id == 0x09) {                /* vendor-specific: virtio_pci_cap */
            int bar = pci_r8(b, d, f, off + 4);
            uint32_t boff = pci_r32(b, d, f, off + 8);
            uintptr_t base = bar < 6 ? pci_mem_bar(b, d, f, bar) : 0;
            if (base) {
                if (type == 1 && !t.common)
                    t.common = base + boff;
                else if (type == 2 && !t.notify) {
                    t.notify = base + boff;
                    t.notify_mult = pci_r32(b, d, f, off + 16);
                } else if (type == 3 && !t.isr)
                    t.isr = base + boff;
                else if (type == 4 && !t.devcfg)
                    t.devcfg = base + boff;
            }
        }
        off = pci_r8(b, d, f, off + 1) & 0xfc;
    }
    return (t.common && t.notify && t.isr && t.devcfg) ? 0 : -1;
}

static int probe_pci(int force)
{
    for (int b = 0; b < 256; b++) {
        for (int d = 0; d < 32; d++) {
            uint32_t id = pci_r32(b, d, 0, 0);
            if ((id & 0xffff) == 0xffff) {
                if (b > 0 && d == 0)
                    break;
                continue;
            }
            int nfn = (pci_r8(b, d, 0, 0x0e) & 0x80) ? 8 : 1;
            for (int f = 0; f < nfn; f++) {
                id = pci_r32(b, d, f, 0);
                uint16_t ven = (uint16_t)id, dev = (uint16_t)(id >> 16);
                if (ven != 0x1af4)
                    continue;
                /* 4.1.2 PCI Device Discovery: 0x1041 is modern net; the
                 * transitional 0x1000 is net when subsystem id is 1. */
                int transitional = dev == 0x1000 && pci_r16(b, d, f, 0x2e) == 1;
                if (!transitional && dev != 0x1041)
                    continue;
                t.bus = (uint8_t)b;
                t.dev = (uint8_t)d;
                t.fn = (uint8_t)f;
                /* Bus mastering is off after SeaBIOS: enable I/O, memory, BM. */
                pci_w16(b, d, f, 0x04, (uint16_t)(pci_r16(b, d, f, 0x04) | 0x7));
                int has_modern = pci_modern_caps(b, d, f) == 0;
                uint32_t bar0 = pci_r32(b, d, f, 0x10);
                int has_legacy = transitional && (bar0 & 1) && (bar0 & ~3u);
                if (force == FORCE_LEGACY && !has_legacy)
                    return -1;
                if (force == FORCE_MODERN && !has_modern)
                    return -1;
                if (has_modern && force != FORCE_LEGACY) {
                    t.kind = T_MODERN;
                } else if (has_legacy) {
                    t.kind = T_LEGACY;
                    t.io = (uint16_t)(bar0 & ~3u);
                } else {
                    return -1;
                }
                vdev_info.pci_bdf = (uint32_t)b << 8 | (uint32_t)d << 3 | (uint32_t)f;
                return 0;
            }
        }
    }
    return -1;
}

/* 4.2.2 MMIO Device Register Layout */
#define MMIO_MAGIC 0x000
#define MMIO_VERSION 0x004
#define MMIO_DEVICE_ID 0x008
#define MMIO_DEVICE_FEATURES 0x010
#define MMIO_DEVICE_FEATURES_SEL 0x014
#define MMIO_DRIVER_FEATURES 0x020
#define MMIO_DRIVER_FEATURES_SEL 0x024
#define MMIO_GUEST_PAGE_SIZE 0x028       /* legacy only */
#define MMIO_QUEUE_SEL 0x030
#define MMIO_QUEUE_NUM_MAX 0x034
#define MMIO_QUEUE_NUM 0x038
#define MMIO_QUEUE_ALIGN 0x03c           /* legacy only */
#define MMIO_QUEUE_PFN 0x040             /* legacy only */
#define MMIO_QUEUE_READY 0x044
#define MMIO_QUEUE_NOTIFY 0x050
#define MMIO_INTERRUPT_STATUS 0x060
#define MMIO_INTERRUPT_ACK 0x064
#define MMIO_STATUS 0x070
#define MMIO_QUEUE_DESC_LOW 0x080
#define MMIO_QUEUE_DESC_HIGH 0x084
#define MMIO_QUEUE_AVAIL_LOW 0x090
#define MMIO_QUEUE_AVAIL_HIGH 0x094
#define MMIO_QUEUE_USED_LOW 0x0a0
#define MMIO_QUEUE_USED_HIGH 0x0a4
#define MMIO_CONFIG 0x100

static int probe_mmio(void)
{
    /* QEMU microvm places virtio-mmio transports at 0xfeb00000 + n * 0x200. */
    for (uint32_t n = 0; n < 32; n++) {
        uintptr_t base = 0xfeb00000u + n * 0x200u;
        if (mmio_r32(base + MMIO_MAGIC) != 0x74726976)  /* "virt" */
            return -1;
        uint32_t ver = mmio_r32(base + MMIO_VERSION);
        if (mmio_r32(base + MMIO_DEVICE_ID) != 1 || (ver != 1 && ver != 2))
            continue;
        t.mmio = base;
        t.kind = ver == 1 ? T_MMIO1 : T_MMIO2;
        vdev_info.pci_bdf = (uint32_t)base;
        return 0;
    }
    return -1;
}

int vt_probe(int force)
{
    memset(&t, 0, sizeof(t));
    int r = -1;
    if (force != FORCE_MMIO)
        r = probe_pci(force);
    if (r && (force == FORCE_AUTO || force == FORCE_MMIO))
        r = probe_mmio();
    static const uint32_t map[] = {VDEV_TRANSPORT_NONE, VDEV_TRANSPORT_PCI_LEGACY,
                                   VDEV_TRANSPORT_PCI_MODERN, VDEV_TRANSPORT_MMIO_LEGACY,
                                   VDEV_TRANSPORT_MMIO_MODERN};
    vdev_info.transport = r ? VDEV_TRANSPORT_NONE : map[t.kind];
    return r;
}

const char *vt_name(void)
{
    static const char *const names[] = {"none", "legacy", "modern", "mmio-legacy", "mmio"};
    return names[t.kind];
}

int vt_is_modern(void)
{
    return t.kind == T_MODERN || t.kind == T_MMIO2;
}

/* 4.1.4.3 Common configuration structure layout */
#define CC_DFSEL 0
#define CC_DF 4
#define CC_GFSEL 8
#define CC_GF 12
#define CC_MSIX_CONFIG 16
#define CC_STATUS 20
#define CC_QSEL 22
#define CC_QSIZE 24
#define CC_QMSIX 26
#define CC_QENABLE 28
#define CC_QNOTIFY_OFF 30
#define CC_QDESC 32
#define CC_QDRIVER 40
#define CC_QDEVICE 48

uint8_t vt_get_status(void)
{
    switch (t.kind) {
    case T_LEGACY:
        return inb((uint16_t)(t.io + VIRTIO_PCI_STATUS));
    case T_MODERN:
        return mmio_r8(t.common + CC_STATUS);
    case T_MMIO1:
    case T_MMIO2:
        return (uint8_t)mmio_r32(t.mmio + MMIO_STATUS);
    }
    return 0;
}

void vt_set_status(uint8_t s)
{
    switch (t.kind) {
    case T_LEGACY:
        outb((uint16_t)(t.io + VIRTIO_PCI_STATUS), s);
        break;
    case T_MODERN:
        mmio_w8(t.common + CC_STATUS, s);
        break;
    case T_MMIO1:
    case T_MMIO2:
        mmio_w32(t.mmio + MMIO_STATUS, s);
        break;
    }
}

void vt_reset(void)
{
    vt_set_status(0);
    /* 4.1.4.3.2: after writing 0 the driver MUST wait for a read of 0. */
    for (int i = 0; i < 1000000 && vt_get_status() != 0; i++)
        cpu_relax();
}

uint64_t vt_device_features(void)
{
    switch (t.kind) {
    case T_LEGACY:
        return inl((uint16_t)(t.io + VIRTIO_PCI_HOST_FEATURES));
    case T_MODERN: {
        mmio_w32(t.common + CC_DFSEL, 0);
        uint32_t lo = mmio_r32(t.common + CC_DF);
        mmio_w32(t.common + CC_DFSEL, 1);
        return (uint64_t)mmio_r32(t.common + CC_DF) << 32 | lo;
    }
    case T_MMIO1:
    case T_MMIO2: {
        mmio_w32(t.mmio + MMIO_DEVICE_FEATURES_SEL, 0);
        uint32_t lo = mmio_r32(t.mmio + MMIO_DEVICE_FEATURES);
        mmio_w32(t.mmio + MMIO_DEVICE_FEATURES_SEL, 1);
        uint32_t hi = t.kind == T_MMIO2 ? mmio_r32(t.mmio + MMIO_DEVICE_FEATURES) : 0;
        return (uint64_t)hi << 32 | lo;
    }
    }
    return 0;
}

void vt_set_driver_features(uint64_t f)
{
    switch (t.kind) {
    case T_LEGACY:
        outl((uint16_t)(t.io + VIRTIO_PCI_GUEST_FEATURES), (uint32_t)f);
        break;
    case T_MODERN:
        mmio_w32(t.common + CC_GFSEL, 0);
        mmio_w32(t.common + CC_GF, (uint32_t)f);
        mmio_w32(t.common + CC_GFSEL, 1);
        mmio_w32(t.common + CC_GF, (uint32_t)(f >> 32));
        break;
    case T_MMIO1:
    case T_MMIO2:
        mmio_w32(t.mmio + MMIO_DRIVER_FEATURES_SEL, 0);
        mmio_w32(t.mmio + MMIO_DRIVER_FEATURES, (uint32_t)f);
        mmio_w32(t.mmio + MMIO_DRIVER_FEATURES_SEL, 1);
        mmio_w32(t.mmio + MMIO_DRIVER_FEATURES, (uint32_t)(f >> 32));
        break;
    }
}

uint16_t vt_queue_max(uint16_t q)
{
    switch (t.kind) {
    case T_LEGACY:
        outw((uint16_t)(t.io + VIRTIO_PCI_QUEUE_SEL), q);
        return inw((uint16_t)(t.io + VIRTIO_PCI_QUEUE_NUM));
    case T_MODERN:
        mmio_w16(t.common + CC_QSEL, q);
        return mmio_r16(t.common + CC_QSIZE);
    case T_MMIO1:
    case T_MMIO2:
        mmio_w32(t.mmio + MMIO_QUEUE_SEL, q);
        return (uint16_t)mmio_r32(t.mmio + MMIO_QUEUE_NUM_MAX);
    }
    return 0;
}

/* Rings are laid out the legacy way (used ring 4096-aligned) for every
 * transport, so the same memory works for the PFN interfaces too. */
int vt_queue_setup(uint16_t q, uint16_t size, uintptr_t desc, uintptr_t avail, uintptr_t used)
{
    switch (t.kind) {
    case T_LEGACY:
        /* 4.1.4.8 Legacy Interfaces: queue size is fixed by the device. */
        outw((uint16_t)(t.io + VIRTIO_PCI_QUEUE_SEL), q);
        if (inw((uint16_t)(t.io + VIRTIO_PCI_QUEUE_NUM)) != size)
            return -1;
        outl((uint16_t)(t.io + VIRTIO_PCI_QUEUE_PFN), (uint32_t)(desc >> 12));
        return 0;
    case T_MODERN:
        mmio_w16(t.common + CC_QSEL, q);
        mmio_w16(t.common + CC_QSIZE, size);
        mmio_w32(t.common + CC_QDESC, (uint32_t)desc);
        mmio_w32(t.common + CC_QDESC + 4, 0);
        mmio_w32(t.common + CC_QDRIVER, (uint32_t)avail);
        mmio_w32(t.common + CC_QDRIVER + 4, 0);
        mmio_w32(t.common + CC_QDEVICE, (uint32_t)used);
        mmio_w32(t.common + CC_QDEVICE + 4, 0);
        if (q < VDEV_MAX_VQS)
            t.notify_off[q] = mmio_r16(t.common + CC_QNOTIFY_OFF);
        mmio_w16(t.common + CC_QENABLE, 1);
        return 0;
    case T_MMIO1:
        mmio_w32(t.mmio + MMIO_GUEST_PAGE_SIZE, 4096);
        mmio_w32(t.mmio + MMIO_QUEUE_SEL, q);
        mmio_w32(t.mmio + MMIO_QUEUE_NUM, size);
        mmio_w32(t.mmio + MMIO_QUEUE_ALIGN, 4096);
        mmio_w32(t.mmio + MMIO_QUEUE_PFN, (uint32_t)(desc >> 12));
        return 0;
    case T_MMIO2:
        mmio_w32(t.mmio + MMIO_QUEUE_SEL, q);
        mmio_w32(t.mmio + MMIO_QUEUE_NUM, size);
        mmio_w32(t.mmio + MMIO_QUEUE_DESC_LOW, (uint32_t)desc);
        mmio_w32(t.mmio + MMIO_QUEUE_DESC_HIGH, 0);
        mmio_w32(t.mmio + MMIO_QUEUE_AVAIL_LOW, (uint32_t)avail);
        mmio_w32(t.mmio + MMIO_QUEUE_AVAIL_HIGH, 0);
        mmio_w32(t.mmio + MMIO_QUEUE_USED_LOW, (uint32_t)used);
        mmio_w32(t.mmio + MMIO_QUEUE_USED_HIGH, 0);
        mmio_w32(t.mmio + MMIO_QUEUE_READY, 1);
        return 0;
    }
    return -1;
}

void vt_notify(uint16_t q)
{
    switch (t.kind) {
    case T_LEGACY:
        outw((uint16_t)(t.io + VIRTIO_PCI_QUEUE_NOTIFY), q);
        break;
    case T_MODERN:
        /* 4.1.4.4 Notification structure layout: cap.offset + queue_notify_off * multiplier. */
        mmio_w16(t.notify + (uintptr_t)t.notify_off[q < VDEV_MAX_VQS ? q : 0] * t.notify_mult, q);
        break;
    case T_MMIO1:
    case T_MMIO2:
        mmio_w32(t.mmio + MMIO_QUEUE_NOTIFY, q);
        break;
    }
}

uint8_t vt_cfg8(uint32_t off)
{
    switch (t.kind) {
    case T_LEGACY:
        /* 4.1.4.8: the device-specific config starts at 20, or at 24 while
         * MSI-X is enabled (the two vector registers come first). */
        return inb((uint16_t)(t.io + (t.msix_on ? VIRTIO_PCI_CONFIG_MSIX : VIRTIO_PCI_CONFIG_NO_MSIX) +
                              off));
    case T_MODERN:
        return mmio_r8(t.devcfg + off);
    case T_MMIO1:
    case T_MMIO2:
        return mmio_r8(t.mmio + MMIO_CONFIG + off);
    }
    return 0;
}

uint16_t vt_cfg16(uint32_t off)
{
    return (uint16_t)(vt_cfg8(off) | (uint16_t)vt_cfg8(off + 1) << 8);
}

int vt_is_pci(void)
{
    return t.kind == T_LEGACY || t.kind == T_MODERN;
}

uint32_t vt_mmio_index(void)
{
    return t.mmio ? (uint32_t)(t.mmio - 0xfeb00000u) / 0x200u : 0;
}

/* INTx acknowledge.  4.1.4.5.1: reading the ISR status resets it and drops
 * the interrupt line; 4.2.2: virtio-mmio reports in InterruptStatus and is
 * acknowledged by writing the same bits to InterruptACK. */
uint8_t vt_read_isr(void)
{
    switch (t.kind) {
    case T_LEGACY:
        return inb((uint16_t)(t.io + VIRTIO_PCI_ISR));
    case T_MODERN:
        return mmio_r8(t.isr);
    case T_MMIO1:
    case T_MMIO2: {
        uint32_t v = mmio_r32(t.mmio + MMIO_INTERRUPT_STATUS);
        if (v)
            mmio_w32(t.mmio + MMIO_INTERRUPT_ACK, v);
        return (uint8_t)v;
    }
    }
    return 0;
}

/* The INTx line: PCI Interrupt Line (0x3c, written by the firmware: an
 * 8259 IRQ on pc and q35, which is also the IOAPIC pin there).  virtio-mmio
 * has no config space; the caller supplies its pin. */
int vt_intx_line(uint32_t *line, int *gsi)
{
    if (!vt_is_pci())
        return -1;
    uint8_t pin = pci_r8(t.bus, t.dev, t.fn, 0x3d), l = pci_r8(t.bus, t.dev, t.fn, 0x3c);
    if (pin == 0 || l == 0 || l >= 16)
        return -1;
    *line = l;
    *gsi = l;
    return 0;
}

/* ---- MSI-X (PCI Local Bus 3.0, 6.8.2; virtio 4.1.4.3 / 4.1.5.1.2) ---- */
int vt_msix_on(void)
{
    return t.msix_on;
}

/* Program `want` table entries to deliver vectors first_vector + n to the
 * boot CPU's local APIC (message address 0xfee00000, fixed, edge), then
 * enable MSI-X.  Returns the number of entries programmed (0: no MSI-X). */
int vt_msix_enable(uint32_t want, uint8_t first_vector)
{
    if (!vt_is_pci() || !t.msix_cap)
        return 0;
    int b = t.bus, d = t.dev, f = t.fn, c = t.msix_cap;
    uint16_t ctrl = pci_r16(b, d, f, c + 2);
    uint32_t size = (ctrl & 0x7ffu) + 1, tbl = pci_r32(b, d, f, c + 4);
    uintptr_t base = pci_mem_bar(b, d, f, (int)(tbl & 7));
    if (!base)
        return 0;
    uintptr_t table = base + (tbl & ~7u);
    uint32_t n = want < size ? want : size;
    /* Function mask while the table is written (6.8.2.3). */
    pci_w16(b, d, f, c + 2, (uint16_t)(ctrl | 0x4000));
    for (uint32_t i = 0; i < size; i++) {
        uintptr_t e = table + 16u * i;
        if (i < n) {
            mmio_w32(e + 0, 0xfee00000u);    /* destination: APIC id 0, physical */
            mmio_w32(e + 4, 0);
            mmio_w32(e + 8, (uint32_t)first_vector + i);
            mmio_w32(e + 12, 0);             /* unmasked */
        } else {
            mmio_w32(e + 12, 1);             /* masked */
        }
    }
    pci_w16(b, d, f, c + 2, (uint16_t)((ctrl & ~0x4000u) | 0x8000u));
    /* INTx is disabled while MSI-X is on (PCI command bit 10 for good measure). */
    pci_w16(b, d, f, 0x04, (uint16_t)(pci_r16(b, d, f, 0x04) | 0x400));
    t.msix_on = 1;
    return (int)n;
}

void vt_msix_disable(void)
{
    if (!vt_is_pci() || !t.msix_cap)
        return;
    int b = t.bus, d = t.dev, f = t.fn, c = t.msix_cap;
    pci_w16(b, d, f, c + 2, (uint16_t)(pci_r16(b, d, f, c + 2) & ~0x8000u));
    pci_w16(b, d, f, 0x04, (uint16_t)(pci_r16(b, d, f, 0x04) & ~0x400u));
    t.msix_on = 0;
}

uint16_t vt_set_config_vector(uint16_t v)
{
    switch (t.kind) {
    case T_LEGACY:
        outw((uint16_t)(t.io + VIRTIO_MSI_CONFIG_VECTOR), v);
        return inw((uint16_t)(t.io + VIRTIO_MSI_CONFIG_VECTOR));
    case T_MODERN:
        mmio_w16(t.common + CC_MSIX_CONFIG, v);
        return mmio_r16(t.common + CC_MSIX_CONFIG);
    }
    return VIRTIO_MSI_NO_VECTOR;
}

uint16_t vt_set_queue_vector(uint16_t q, uint16_t v)
{
    switch (t.kind) {
    case T_LEGACY:
        outw((uint16_t)(t.io + VIRTIO_PCI_QUEUE_SEL), q);
        outw((uint16_t)(t.io + VIRTIO_MSI_QUEUE_VECTOR), v);
        return inw((uint16_t)(t.io + VIRTIO_MSI_QUEUE_VECTOR));
    case T_MODERN:
        mmio_w16(t.common + CC_QSEL, q);
        mmio_w16(t.common + CC_QMSIX, v);
        return mmio_r16(t.common + CC_QMSIX);
    }
    return VIRTIO_MSI_NO_VECTOR;
}
