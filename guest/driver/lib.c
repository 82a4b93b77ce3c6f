/* The freestanding runtime: memory/string helpers, COM1, printf, clock. */
#include <stdarg.h>
#include "hw.h"

void *memset(void *d, int c, size_t n)
{
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    void *r = d;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return r;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const uint8_t *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] < y[i] ? -1 : 1;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int streq(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return *a == *b;
}

/* Decimal or 0x-hex; returns 0 on success. */
int parse_uint(const char *s, uint32_t *out)
{
    uint32_t v = 0;
    int base = 10;
    if (!s || !*s)
        return -1;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
        if (!*s)
            return -1;
    }
    for (; *s; s++) {
        uint32_t d;
        if (*s >= '0' && *s <= '9')
            d = (uint32_t)(*s - '0');
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = (uint32_t)(*s - 'a' + 10);
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = (uint32_t)(*s - 'A' + 10);
        else
            return -1;
        v = v * (uint32_t)base + d;
    }
    *out = v;
    return 0;
}

int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int parse_mac(const char *s, uint8_t mac[6])
{
    for (int i = 0; i < 6; i++) {
        int h = hexval(s[0]), l = hexval(s[1]);
        if (h < 0 || l < 0)
            return -1;
        mac[i] = (uint8_t)(h << 4 | l);
        s += 2;
        if (i < 5 && *s++ != ':')
            return -1;
    }
    return *s ? -1 : 0;
}

/* 64/32 division without libgcc: two divl steps, each quotient fits 32 bits. */
uint64_t udiv64(uint64_t n, uint32_t d, uint32_t *rem)
{
    uint32_t hi = (uint32_t)(n >> 32), lo = (uint32_t)n;
    uint32_t qhi = hi / d, r = hi % d, qlo;
    __asm__("divl %4" : "=a"(qlo), "=d"(r) : "a"(lo), "d"(r), "rm"(d));
    if (rem)
        *rem = r;
    return ((uint64_t)qhi << 32) | qlo;
}

/* ---- COM1, polled (16550: LSR bit 0 = data ready, bit 5 = THR empty) ---- */
#define COM1 0x3f8

void serial_init(void)
{
    outb(COM1 + 1, 0x00);       /* no interrupts: we poll */
    outb(COM1 + 3, 0x80);       /* DLAB */
    outb(COM1 + 0, 0x01);       /* 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);       /* 8N1 */
    /* FCR is left alone: toggling the FIFO enable flushes the receive side
     * and would drop a command typed before we got here. */
    outb(COM1 + 4, 0x03);       /* DTR, RTS */
}

/* IER bit 0: interrupt when a received byte is ready.  The handler only
 * acknowledges the PIC; the byte stays in the UART until serial_getc reads
 * it, which also drops the interrupt line. */
void serial_rx_irq(int on)
{
    outb(COM1 + 1, on ? 0x01 : 0x00);
    outb(COM1 + 4, on ? 0x0b : 0x03);   /* OUT2 gates the UART's IRQ line on PC UARTs */
}

void serial_putc(char c)
{
    if (c == '\n')
        serial_putc('\r');
    while (!(inb(COM1 + 5) & 0x20))
        cpu_relax();
    outb(COM1, (uint8_t)c);
}

int serial_getc(void)
{
    if (inb(COM1 + 5) & 0x01)
        return inb(COM1);
    return -1;
}

void kputs(const char *s)
{
    while (*s)
        serial_putc(*s++);
}

static void put_u64(uint64_t v, unsigned base, int width, char pad)
{
    char buf[24];
    int n = 0;
    do {
        uint32_t r;
        v = udiv64(v, base, &r);
        buf[n++] = "0123456789abcdef"[r];
    } while (v);
    while (n < width--)
        serial_putc(pad);
    while (n)
        serial_putc(buf[--n]);
}

/* %s %c %d %u %x %llu %llx %%, with optional zero-pad width (e.g. %02x). */
void kprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            serial_putc(*fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        int width = 0, ll = 0;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') {
            ll++;
            fmt++;
        }
        switch (*fmt) {
        case 's': {
            const char *s = va_arg(ap, const char *);
            kputs(s ? s : "(null)");
            break;
        }
        case 'c':
            serial_putc((char)va_arg(ap, int));
            break;
        case 'd': {
            long long v = ll >= 2 ? va_arg(ap, long long) : va_arg(ap, int);
            if (v < 0) {
                serial_putc('-');
                v = -v;
            }
            put_u64((uint64_t)v, 10, width, pad);
            break;
        }
        case 'u':
        case 'x': {
            uint64_t v = ll >= 2 ? va_arg(ap, uint64_t) : va_arg(ap, uint32_t);
            put_u64(v, *fmt == 'x' ? 16 : 10, width, pad);
            break;
        }
        case '%':
            serial_putc('%');
            break;
        default:
            serial_putc('?');
            break;
        }
    }
    va_end(ap);
}

/* ---- Clock: TSC calibrated against PIT channel 0 ---- */
uint32_t tsc_per_ms = 2000000;          /* used only if the PIT does not count */

static uint16_t pit0_read(void)
{
    outb(0x43, 0x00);                   /* latch channel 0 */
    uint8_t lo = inb(0x40);
    uint8_t hi = inb(0x40);
    return (uint16_t)(hi << 8 | lo);
}

void timer_init(void)
{
    /* Let channel 0 count down from 0xffff (mode 2, 1.193182 MHz) and see how
     * far the TSC moves while it passes 5966 ticks (5 ms).  Channel 0 rather
     * than the usual channel 2: its gate is always on, whereas channel 2 is
     * gated through port 0x61, which microvm does not have.  Interrupts stay
     * disabled, so its IRQ0 output does not matter. */
    const uint16_t ticks = 5966;
    outb(0x43, 0x34);                   /* ch0, lo/hi, mode 2, binary */
    outb(0x40, 0xff);
    outb(0x40, 0xff);
    uint16_t c0 = pit0_read();
    uint64_t t0 = rdtsc();
    for (uint32_t spins = 0; spins < 2000000; spins++) {
        uint16_t c = pit0_read();
        /* mode 2 reloads at 1, so elapsed = c0 - c modulo the period */
        uint16_t el = (uint16_t)(c0 - c);
        if (el >= ticks && el < 0x8000) {
            uint64_t t1 = rdtsc();
            uint64_t per = udiv64(udiv64((t1 - t0) * 1193182ULL, el, NULL), 1000, NULL);
            if (per > 1000 && per < 0xffffffffULL)
                tsc_per_ms = (uint32_t)per;
            return;
        }
    }
}

/* Channel 0, mode 2 (rate generator): one IRQ0 every 1193182 / hz ticks. */
void pit_periodic(uint32_t hz)
{
    uint32_t div = 1193182u / (hz ? hz : 1);
    if (div < 2)
        div = 2;
    if (div > 0xffff)
        div = 0xffff;
    outb(0x43, 0x34);
    outb(0x40, (uint8_t)div);
    outb(0x40, (uint8_t)(div >> 8));
}

uint64_t time_deadline(uint32_t ms)
{
    return rdtsc() + (uint64_t)ms * tsc_per_ms;
}

int time_expired(uint64_t deadline)
{
    return rdtsc() >= deadline;
}

uint32_t time_since_ms(uint64_t tsc0)
{
    return (uint32_t)udiv64(rdtsc() - tsc0, tsc_per_ms, NULL);
}

/* isa-debug-exit at 0xf4: QEMU exits with (code << 1) | 1. */
void debug_exit(uint32_t code)
{
    outl(0xf4, code);
    /* No debug-exit device: shut down through the ACPI-less fallback and halt. */
    for (;;)
        __asm__ volatile("cli; hlt");
}
