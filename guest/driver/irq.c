/*
 * Interrupt plumbing: the IDT, the 8259 PIC, the local APIC and an IOAPIC,
 * and the routing of the NIC's interrupt:
 *
 *   INTx through the PIC   pc / q35 (the firmware wrote the PIC IRQ into the
 *                          function's Interrupt Line register, level mode)
 *   INTx through an IOAPIC intx=ioapic on pc / q35 (same pin number), and
 *                          virtio-mmio on microvm (QEMU wires transport n to
 *                          the second IOAPIC's pin n, GSI 24 + n)
 *   MSI-X                  msix=1: one vector for configuration changes and
 *                          one per queue (or one shared by all queues)
 *
 * The PIT (IRQ0) ticks at IRQ_TIMER_HZ so a halted driver wakes up to check
 * deadlines and its lost-interrupt watchdog, and COM1's "data ready" (IRQ4)
 * wakes it for console input.  Handlers only count, acknowledge the device
 * and set flags; net.c's waiters do the work.
 */
#include "driver.h"

struct irq_opts irq_opts = {.on = 1, .msix = 0, .ioapic = 0, .wd_ms = 250, .mmio_irq = -1};

struct idt_gate {
    uint16_t off_lo;
    uint16_t sel;
    uint8_t zero;
    uint8_t type;
    uint16_t off_hi;
} __attribute__((packed));

struct idt_ptr {
    uint16_t limit;
    uint32_t base;
} __attribute__((packed));

/* What isr_common (boot.S) pushed: pushal, vector, error code, then the CPU's frame. */
struct irq_frame {
    uint32_t edi, esi, ebp, esp, ebx, edx, ecx, eax;
    uint32_t vector, err, eip, cs, eflags;
};

extern const uint32_t isr_table[65];
static struct idt_gate idt[256];
static int mode = VDEV_IRQ_POLL;
uint64_t vdev_ticks, vdev_halts;         /* exported: they move while the driver idles */
static uint32_t nic_irq = 0xffffffffu;   /* PIC IRQ of the NIC (INTX_PIC) */
static uintptr_t lapic;                  /* local APIC MMIO base, 0 until enabled */

#define PIC1 0x20
#define PIC2 0xa0
#define ELCR1 0x4d0
#define ELCR2 0x4d1
#define IOAPIC1 0xfec00000u
#define IOAPIC2 0xfec10000u              /* QEMU's IO_APIC_SECONDARY_ADDRESS, GSI 24..47 */

static void set_gate(uint32_t v, uint32_t handler)
{
    idt[v].off_lo = (uint16_t)handler;
    idt[v].sel = 0x08;
    idt[v].zero = 0;
    idt[v].type = 0x8e;                  /* present, ring 0, 32-bit interrupt gate */
    idt[v].off_hi = (uint16_t)(handler >> 16);
}

/* ---- 8259 PIC ---- */
static uint8_t pic_mask1 = 0xfb, pic_mask2 = 0xff; /* everything masked but the cascade */

static void pic_write_masks(void)
{
    outb(PIC1 + 1, pic_mask1);
    outb(PIC2 + 1, pic_mask2);
}

static void pic_unmask(uint32_t irq)
{
    if (irq < 8)
        pic_mask1 = (uint8_t)(pic_mask1 & ~(1u << irq));
    else
        pic_mask2 = (uint8_t)(pic_mask2 & ~(1u << (irq - 8)));
    pic_write_masks();
}

static void pic_mask(uint32_t irq)
{
    if (irq < 8)
        pic_mask1 = (uint8_t)(pic_mask1 | 1u << irq);
    else
        pic_mask2 = (uint8_t)(pic_mask2 | 1u << (irq - 8));
    pic_write_masks();
}

static void pic_eoi(uint32_t irq)
{
    if (irq >= 8)
        outb(PIC2, 0x20);
    outb(PIC1, 0x20);
}

/* PCI INTx is level triggered: set the line's bit in the edge/level control
 * register (the firmware usually did; ELCR survives the ICW1 below). */
static void pic_set_level(uint32_t irq)
{
    uint16_t port = irq < 8 ? ELCR1 : ELCR2;
    outb(port, (uint8_t)(inb(port) | 1u << (irq & 7)));
}

static void pic_remap(void)
{
    outb(PIC1, 0x11);                    /* ICW1: edge by default, cascade, ICW4 */
    outb(PIC2, 0x11);
    outb(PIC1 + 1, VEC_PIC_BASE);        /* ICW2: vector offsets */
    outb(PIC2 + 1, VEC_PIC_BASE + 8);
    outb(PIC1 + 1, 4);                   /* ICW3: slave on IRQ2 */
    outb(PIC2 + 1, 2);
    outb(PIC1 + 1, 1);                   /* ICW4: 8086 mode */
    outb(PIC2 + 1, 1);
    pic_write_masks();
}

/* ---- local APIC and IOAPIC ---- */
static void lapic_w(uint32_t reg, uint32_t v) { mmio_w32(lapic + reg, v); }

static void lapic_enable(void)
{
    if (lapic)
        return;
    lapic = (uintptr_t)(rdmsr(0x1b) & 0xfffff000u); /* IA32_APIC_BASE */
    lapic_w(0x80, 0);                    /* TPR: accept every priority */
    /* LINT0 as ExtINT keeps the 8259 (timer, COM1) delivering through the
     * APIC ("virtual wire"); LINT1 is NMI. */
    lapic_w(0x350, 0x700);
    lapic_w(0x360, 0x400);
    lapic_w(0xf0, 0x100 | VEC_SPURIOUS); /* SVR: software enable */
}

static void lapic_eoi(void)
{
    if (lapic)
        lapic_w(0xb0, 0);
}

static uint32_t ioapic_r(uintptr_t base, uint32_t reg)
{
    mmio_w32(base, reg);
    return mmio_r32(base + 0x10);
}

static void ioapic_w(uintptr_t base, uint32_t reg, uint32_t v)
{
    mmio_w32(base, reg);
    mmio_w32(base + 0x10, v);
}

static int ioapic_pins(uintptr_t base)
{
    uint32_t ver = ioapic_r(base, 1);
    if (ver == 0xffffffffu || ver == 0)
        return 0;
    return (int)((ver >> 16) & 0xff) + 1;
}

static uintptr_t ioapic_base;
static uint32_t ioapic_pin = 0xffffffffu;

/* Redirection entry: fixed delivery to APIC id 0, active high (QEMU's INTx
 * lines are), level triggered (remote IRR is cleared by the local APIC's
 * EOI), or masked. */
static int ioapic_route(uint32_t gsi, uint8_t vector)
{
    uintptr_t base = gsi >= 24 ? IOAPIC2 : IOAPIC1;
    uint32_t pin = gsi >= 24 ? gsi - 24 : gsi;
    if ((int)pin >= ioapic_pins(base))
        return -1;
    lapic_enable();
    ioapic_w(base, 0x11 + 2 * pin, 0);
    ioapic_w(base, 0x10 + 2 * pin, vector | 1u << 15);
    ioapic_base = base;
    ioapic_pin = pin;
    return 0;
}

static void ioapic_unroute(void)
{
    if (ioapic_base && ioapic_pin != 0xffffffffu)
        ioapic_w(ioapic_base, 0x10 + 2 * ioapic_pin, 1u << 16);
    ioapic_base = 0;
    ioapic_pin = 0xffffffffu;
}

/* ---- set-up ---- */
void irq_init(void)
{
    for (uint32_t v = 0; v < 64; v++)
        set_gate(v, isr_table[v]);
    set_gate(VEC_SPURIOUS, isr_table[64]);
    struct idt_ptr p = {sizeof(idt) - 1, (uint32_t)(uintptr_t)idt};
    __asm__ volatile("lidt %0" : : "m"(p));
    pic_remap();
}

int irq_enabled(void)
{
    return mode != VDEV_IRQ_POLL;
}

void irq_unroute_nic(void)
{
    if (mode == VDEV_IRQ_MSIX)
        vt_msix_disable();
    if (nic_irq != 0xffffffffu)
        pic_mask(nic_irq);
    nic_irq = 0xffffffffu;
    ioapic_unroute();
}

/* Route the NIC's interrupt; called at every device bring-up (a reset
 * clears the device's MSI-X vector registers).  Returns the VDEV_IRQ_* mode. */
int irq_route_nic(void)
{
    cli();
    irq_unroute_nic();
    mode = VDEV_IRQ_POLL;
    vdev_info.irq_line = 0;
    if (!irq_opts.on) {
        serial_rx_irq(0);
        pic_mask(0);
        pic_mask(4);
        vdev_info.irq_mode = mode;
        return mode;
    }
    if (irq_opts.msix && vt_is_pci()) {
        lapic_enable();
        int n = vt_msix_enable(VEC_MSIX_MAX, VEC_MSIX_BASE);
        if (n >= 2) {
            mode = VDEV_IRQ_MSIX;
            vdev_info.irq_line = (uint32_t)n;
        } else if (n) {
            vt_msix_disable();
        }
    }
    if (mode == VDEV_IRQ_POLL && vt_is_pci()) {
        uint32_t line;
        int gsi;
        if (vt_intx_line(&line, &gsi) == 0) {
            if (irq_opts.ioapic && ioapic_route((uint32_t)gsi, VEC_NIC_APIC) == 0) {
                mode = VDEV_IRQ_INTX_IOAPIC;
                vdev_info.irq_line = (uint32_t)gsi;
            } else {
                pic_set_level(line);
                nic_irq = line;
                pic_unmask(line);
                mode = VDEV_IRQ_INTX_PIC;
                vdev_info.irq_line = line;
            }
        }
    } else if (mode == VDEV_IRQ_POLL) {
        /* virtio-mmio: QEMU microvm wires transport n to GSI 24 + n on the second
         * IOAPIC when it has one (its default with ACPI), else to 5 + n. */
        uint32_t n = vt_mmio_index();
        uint32_t gsi = irq_opts.mmio_irq >= 0 ? (uint32_t)irq_opts.mmio_irq
                       : ioapic_pins(IOAPIC2) ? 24 + n
                                              : 5 + n;
        if (gsi < 16 && !irq_opts.ioapic) {
            pic_set_level(gsi);
            nic_irq = gsi;
            pic_unmask(gsi);
            mode = VDEV_IRQ_INTX_PIC;
            vdev_info.irq_line = gsi;
        } else if (ioapic_route(gsi, VEC_NIC_APIC) == 0) {
            mode = VDEV_IRQ_INTX_IOAPIC;
            vdev_info.irq_line = gsi;
        }
    }
    vdev_info.irq_mode = (uint32_t)mode;
    vdev_info.irq_wd_ms = irq_opts.wd_ms;
    if (mode != VDEV_IRQ_POLL) {
        pit_periodic(IRQ_TIMER_HZ);
        pic_unmask(0);
        serial_rx_irq(1);
        pic_unmask(4);
        sti();
    }
    return mode;
}

/* Sleep until the next interrupt (timer, console, NIC); poll when off. */
void irq_idle(void)
{
    if (mode != VDEV_IRQ_POLL) {
        vdev_halts++;
        sti_hlt();
    } else {
        cpu_relax();
    }
}

static const char *const exc_names[] = {"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM",
                                        "#DF", "?",   "#TS", "#NP", "#SS", "#GP", "#PF", "?",
                                        "#MF", "#AC", "#MC", "#XM"};

void irq_dispatch(struct irq_frame *f);
void irq_dispatch(struct irq_frame *f)
{
    uint32_t v = f->vector;
    if (v < 32) {
        kprintf("\n! exception %u %s err=0x%x eip=0x%x\n", v, v < 20 ? exc_names[v] : "?", f->err,
                f->eip);
        for (;;)
            __asm__ volatile("cli; hlt");
    }
    if (v >= VEC_PIC_BASE && v < VEC_PIC_BASE + 16) {
        uint32_t irq = v - VEC_PIC_BASE;
        if (irq == 7 || irq == 15) {
            /* A spurious 8259 interrupt has no in-service bit: no EOI for it
             * (but the master's cascade bit is in service for IRQ15). */
            uint16_t port = irq == 7 ? PIC1 : PIC2;
            outb(port, 0x0b);
            if (!(inb(port) & 0x80)) {
                if (irq == 15)
                    outb(PIC1, 0x20);
                return;
            }
        }
        if (irq == 0)
            vdev_ticks++;
        else if (irq == nic_irq && mode == VDEV_IRQ_INTX_PIC)
            net_irq_intx();
        pic_eoi(irq);
        return;
    }
    if (v == VEC_NIC_APIC) {
        net_irq_intx();
        lapic_eoi();
        return;
    }
    if (v >= VEC_MSIX_BASE && v < VEC_MSIX_BASE + VEC_MSIX_MAX) {
        net_irq_vector(v - VEC_MSIX_BASE);
        lapic_eoi();
        return;
    }
    /* VEC_SPURIOUS: the local APIC's spurious vector takes no EOI. */
}
