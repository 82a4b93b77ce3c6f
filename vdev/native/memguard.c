/*
 * SIGBUS recovery for guest memory (memguard.h says what and why).
 *
 * The registry is a fixed array written by mg_register/mg_unregister (serialised by a
 * mutex, never taken by the handler) and read by the handler with acquire loads: an entry
 * is published by storing its `state` last, retired by clearing it first.  Everything the
 * handler calls is async-signal-safe (mmap and write are plain system calls; siglongjmp out
 * of a handler of a synchronous fault is the documented recovery), and it never allocates.
 *
 * The handler is installed with SA_NODEFER, so a guard's sigsetjmp need not save the signal
 * mask (no system call per guarded burst): SIGBUS is never blocked in the handler, and a
 * longjmp out of it leaves the thread's mask as it was.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "memguard.h"

struct mg_range {
    uintptr_t base;
    uint64_t len;                 /* page-rounded */
    int notify_fd;
    int state;                    /* 0 free, 1 live (published with release) */
    int gen;                      /* bumped per registration: a handle names one of them */
    uint64_t faults;
    uint64_t fault_addr;
};

static struct mg_range ranges[MG_MAX_RANGES];
static int ranges_hwm;            /* entries [0, hwm) may be live */
static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction previous; /* what unguarded faults go to */
static int installed;
static uint64_t total_faults;
static uint64_t unguarded;
/* Innermost guard of this thread.  initial-exec: this library is dlopen()ed, and the default
 * (general-dynamic) model may allocate on a thread's first access, which must not happen
 * inside the handler (the fault may have hit inside malloc). */
static __thread struct mg_guard *top __attribute__((tls_model("initial-exec")));

static struct mg_range *range_of(uintptr_t addr)
{
    int hwm = __atomic_load_n(&ranges_hwm, __ATOMIC_ACQUIRE);
    for (int i = 0; i < hwm; i++) {
        struct mg_range *r = &ranges[i];
        if (__atomic_load_n(&r->state, __ATOMIC_ACQUIRE) != 1)
            continue;
        if (addr >= r->base && addr - r->base < r->len)
            return r;
    }
    return NULL;
}

static void note_fault(struct mg_range *r, uintptr_t addr)
{
    __atomic_store_n(&r->fault_addr, (uint64_t)addr, __ATOMIC_RELAXED);
    __atomic_add_fetch(&r->faults, 1, __ATOMIC_RELEASE);
    __atomic_add_fetch(&total_faults, 1, __ATOMIC_RELAXED);
    if (r->notify_fd >= 0) {
        uint64_t one = 1;
        ssize_t n = write(r->notify_fd, &one, sizeof one);
        (void)n;  /* a full or closed eventfd: the fault count still says it */
    }
}

static void pass_on(int sig, siginfo_t *info, void *uc)
{
    /* Not guest memory: the fault is real and must still kill (or go to whoever handled
     * SIGBUS before us, e.g. Python's faulthandler, which dumps and re-raises). */
    __atomic_add_fetch(&unguarded, 1, __ATOMIC_RELAXED);
    if ((previous.sa_flags & SA_SIGINFO) && previous.sa_sigaction != NULL) {
        struct sigaction self;
        sigaction(sig, &previous, &self);  /* it may re-raise: let it see its own handler */
        previous.sa_sigaction(sig, info, uc);
        return;  /* a hardware fault re-executes and ends there */
    }
    if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN &&
        previous.sa_handler != NULL) {
        sigaction(sig, &previous, NULL);
        previous.sa_handler(sig);
        return;
    }
    signal(sig, SIG_DFL);
    raise(sig);  /* SA_NODEFER: delivered now, with the default action (a core, the end) */
}

static void on_sigbus(int sig, siginfo_t *info, void *uc)
{
    uintptr_t addr = (uintptr_t)info->si_addr;
    struct mg_range *r = info->si_code > 0 ? range_of(addr) : NULL;  /* kill(): not ours */
    if (r == NULL) {
        pass_on(sig, info, uc);
        return;
    }
    note_fault(r, addr);
    struct mg_guard *g = top;
    if (g != NULL) {
        top = g->prev;
        g->fault_addr = addr;
        siglongjmp(g->env, 1);
    }
    /* Unguarded (Python's memoryview reads): zero pages over the whole mapping; the access
     * retries on them.  The mapping's owner sees the fault count and drops the connection;
     * its munmap later removes these pages like the ones they replaced. */
    void *p = mmap((void *)r->base, r->len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (p == MAP_FAILED)
        pass_on(sig, info, uc);
}

int mg_install(void)
{
    struct sigaction now, sa;
    pthread_mutex_lock(&reg_lock);
    if (sigaction(SIGBUS, NULL, &now) != 0) {
        pthread_mutex_unlock(&reg_lock);
        return errno;
    }
    if (installed && (now.sa_flags & SA_SIGINFO) && now.sa_sigaction == on_sigbus) {
        pthread_mutex_unlock(&reg_lock);
        return 0;
    }
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &previous) != 0) {
        pthread_mutex_unlock(&reg_lock);
        return errno;
    }
    installed = 1;
    pthread_mutex_unlock(&reg_lock);
    return 0;
}

/* A handle is slot + MG_MAX_RANGES * generation, so an owner that unregisters late (or
 * twice) can never free a slot somebody else has been given since. */
static struct mg_range *range_of_handle(int handle)
{
    if (handle < 0)
        return NULL;
    struct mg_range *r = &ranges[handle % MG_MAX_RANGES];
    if (__atomic_load_n(&r->state, __ATOMIC_ACQUIRE) != 1 || r->gen != handle / MG_MAX_RANGES)
        return NULL;
    return r;
}

int mg_register(uintptr_t base, uint64_t len, int notify_fd)
{
    long page = sysconf(_SC_PAGESIZE);
    uint64_t rounded = (len + (uint64_t)page - 1) & ~((uint64_t)page - 1);
    int found = -1;
    pthread_mutex_lock(&reg_lock);
    for (int i = 0; i < MG_MAX_RANGES; i++) {
        struct mg_range *r = &ranges[i];
        if (__atomic_load_n(&r->state, __ATOMIC_RELAXED) == 0) {
            if (found < 0)
                found = i;
            continue;
        }
        /* A live mapping now covers these addresses, so whatever was registered over them
         * was unmapped without being unregistered (its owner was dropped, not closed): a
         * stale entry would take this mapping's faults. */
        if (base < r->base + r->len && r->base < base + rounded) {
            __atomic_store_n(&r->state, 0, __ATOMIC_RELEASE);
            if (found < 0 || i < found)
                found = i;
        }
    }
    int handle = -1;
    if (found >= 0) {
        struct mg_range *r = &ranges[found];
        r->base = base;
        r->len = rounded;
        r->notify_fd = notify_fd;
        r->gen = (r->gen + 1) % (0x7fffffff / MG_MAX_RANGES);
        __atomic_store_n(&r->faults, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&r->fault_addr, 0, __ATOMIC_RELAXED);
        if (found >= ranges_hwm)
            __atomic_store_n(&ranges_hwm, found + 1, __ATOMIC_RELEASE);
        __atomic_store_n(&r->state, 1, __ATOMIC_RELEASE);
        handle = found + MG_MAX_RANGES * r->gen;
    }
    pthread_mutex_unlock(&reg_lock);
    return handle;
}

void mg_unregister(int handle)
{
    pthread_mutex_lock(&reg_lock);
    struct mg_range *r = range_of_handle(handle);
    if (r != NULL)
        __atomic_store_n(&r->state, 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&reg_lock);
}

uint64_t mg_faults(int handle)
{
    struct mg_range *r = range_of_handle(handle);
    return r != NULL ? __atomic_load_n(&r->faults, __ATOMIC_ACQUIRE) : 0;
}

uint64_t mg_fault_addr(int handle)
{
    struct mg_range *r = range_of_handle(handle);
    return r != NULL ? __atomic_load_n(&r->fault_addr, __ATOMIC_ACQUIRE) : 0;
}

uint64_t mg_total_faults(void)
{
    return __atomic_load_n(&total_faults, __ATOMIC_RELAXED);
}

void mg_guard_push(struct mg_guard *g)
{
    g->prev = top;
    g->fault_addr = 0;
    top = g;
}

void mg_guard_pop(struct mg_guard *g)
{
    if (top == g)  /* after a fault the handler popped it already */
        top = g->prev;
}

int mg_copy(void *dst, const void *src, size_t n, uint64_t *fault_addr)
{
    struct mg_guard g;
    MG_GUARD_BEGIN(g) {
        memcpy(dst, src, n);
    } MG_GUARD_RESCUE(g) {
        if (fault_addr != NULL)
            *fault_addr = g.fault_addr;
        MG_GUARD_END(g);
        return MG_FAULT;
    }
    MG_GUARD_END(g);
    return MG_OK;
}

int mg_run(int (*fn)(void *ctx), void *ctx, int *result, uint64_t *fault_addr)
{
    struct mg_guard g;
    volatile int rc = 0;
    MG_GUARD_BEGIN(g) {
        rc = fn(ctx);
    } MG_GUARD_RESCUE(g) {
        if (fault_addr != NULL)
            *fault_addr = g.fault_addr;
        MG_GUARD_END(g);
        return MG_FAULT;
    }
    MG_GUARD_END(g);
    if (result != NULL)
        *result = rc;
    return MG_OK;
}

static int touch(void *ctx)
{
    return *(const volatile uint8_t *)ctx;
}

int mg_probe(const void *addr, uint64_t *fault_addr)
{
    return mg_run(touch, (void *)addr, NULL, fault_addr);
}
