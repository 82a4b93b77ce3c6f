/* Port I/O, MMIO, barriers and the small runtime the driver needs (no libc). */
#ifndef VDEV_GUEST_HW_H
#define VDEV_GUEST_HW_H

#include "skywalk.h"

typedef unsigned int size_t;
typedef int int32_t;
typedef unsigned long uintptr_t;
#define NULL ((void *)0)

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint16_t inw(uint16_t port) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline uint8_t mmio_r8(uintptr_t a) { return *(volatile uint8_t *)a; }
static inline uint16_t mmio_r16(uintptr_t a) { return *(volatile uint16_t *)a; }
static inline uint32_t mmio_r32(uintptr_t a) { return *(volatile uint32_t *)a; }
static inline void mmio_w8(uintptr_t a, uint8_t v) { *(volatile uint8_t *)a = v; }
static inline void mmio_w16(uintptr_t a, uint16_t v) { *(volatile uint16_t *)a = v; }
static inline void mmio_w32(uintptr_t a, uint32_t v) { *(volatile uint32_t *)a = v; }

/* x86 is TSO: a compiler barrier orders stores; mfence orders a store
 * before a later load (needed before reading avail_event / used flags). */
#define barrier() __asm__ volatile("" ::: "memory")
#define mb() __asm__ volatile("mfence" ::: "memory")
#define READ_ONCE16(x) (*(volatile uint16_t *)&(x))
#define READ_ONCE32(x) (*(volatile uint32_t *)&(x))
#define WRITE_ONCE16(x, v) (*(volatile uint16_t *)&(x) = (v))

static inline uint64_t rdtsc(void) { uint32_t lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((uint64_t)hi << 32) | lo; }
static inline void cpu_relax(void) { __asm__ volatile("pause"); }

/* Interrupt flag.  "sti; hlt" is one window: sti takes effect after the next
 * instruction, so an interrupt that arrives in between wakes the hlt instead
 * of being taken before it (the classic lost-wakeup race). */
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt" ::: "memory"); }
static inline uint32_t irq_save(void) { uint32_t f; __asm__ volatile("pushfl; popl %0; cli" : "=r"(f) :: "memory"); return f; }
static inline void irq_restore(uint32_t f) { if (f & 0x200) sti(); }
static inline uint64_t rdmsr(uint32_t msr) { uint32_t lo, hi; __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr)); return ((uint64_t)hi << 32) | lo; }

/* lib.c */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int streq(const char *a, const char *b);
int parse_uint(const char *s, uint32_t *out);
int parse_mac(const char *s, uint8_t mac[6]);
int hexval(char c);
uint64_t udiv64(uint64_t n, uint32_t d, uint32_t *rem);

void serial_init(void);
void serial_rx_irq(int on);     /* COM1 "data ready" interrupt (IRQ4) on/off */
void serial_putc(char c);
int serial_getc(void);          /* -1 when nothing is waiting */
void kputs(const char *s);
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

void timer_init(void);
uint64_t time_deadline(uint32_t ms);
int time_expired(uint64_t deadline);
uint32_t time_since_ms(uint64_t tsc0);
void pit_periodic(uint32_t hz);       /* PIT channel 0 as the tick (IRQ0), after timer_init */
extern uint32_t tsc_per_ms;

void debug_exit(uint32_t code) __attribute__((noreturn));

#endif
