/*
 * Guest memory that cannot kill the process: a SIGBUS handler for the frontend's shared
 * memory (see memguard.c).
 *
 * A vhost-user frontend may shrink or truncate a memfd after SET_MEM_TABLE; the next access
 * to a page past the new end raises SIGBUS.  Mappings registered here are recovered:
 *
 *   - inside a guarded section (mg_run, MG_GUARD_BEGIN/END, mg_copy_*), the faulting thread
 *     jumps back to the section's start, which returns MG_FAULT with the faulting address;
 *   - anywhere else (the Python reference path reading the rings through memoryviews), the
 *     handler puts anonymous zero pages over the whole registered mapping and lets the
 *     access retry, so it completes on harmless memory.
 *
 * Either way the mapping's fault count goes up and its notify eventfd (if any) is written:
 * the connection that owns the mapping is then closed with a named error, at a defined point
 * in its event loop.  A SIGBUS on an address no registered mapping covers is passed to the
 * previous handler (Python's faulthandler, say) or to the default action: it still kills.
 *
 * The block between the FP-CDEF markers is handed verbatim to cffi's cdef by
 * vdev/native/build.py; the guard macros below it are for C users only.
 */
#ifndef VDEV_NATIVE_MEMGUARD_H
#define VDEV_NATIVE_MEMGUARD_H

#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>

/* FP-CDEF-BEGIN */
#define MG_OK 0
#define MG_FAULT 1                /* a guarded access raised SIGBUS on guest memory */
#define MG_MAX_RANGES 1024        /* registered mappings at once (process-wide) */

/* Install the SIGBUS handler (idempotent; reinstalls it if someone replaced it, keeping the
 * replacement as the handler unguarded faults are passed to).  0, or an errno value. */
int mg_install(void);
/* Register [base, base+len) (a whole mmap()ed mapping): its SIGBUS faults are recovered and
 * counted, and notify_fd (an eventfd, or -1) is written once per fault.  Returns a handle
 * >= 0 (slot and generation: a stale handle names nothing), or -1 when MG_MAX_RANGES are in
 * use.  Entries overlapping the new mapping are dropped: their mappings are gone. */
int mg_register(uintptr_t base, uint64_t len, int notify_fd);
/* Forget a handle (before the mapping is unmapped); a stale or repeated handle is a no-op. */
void mg_unregister(int handle);
/* Faults seen on a handle so far, and the address of the last one. */
uint64_t mg_faults(int handle);
uint64_t mg_fault_addr(int handle);
/* Faults on registered mappings, process-wide, and SIGBUS passed on as unguarded. */
uint64_t mg_total_faults(void);

/* memcpy that returns MG_FAULT (with the address in *fault_addr) instead of dying when
 * guest memory went away under it.  dst/src may be any memory; only a registered mapping's
 * fault is recovered. */
int mg_copy(void *dst, const void *src, size_t n, uint64_t *fault_addr);

/* Run fn(ctx) guarded: a SIGBUS on guest memory inside it returns MG_FAULT (fn is abandoned
 * where it faulted: it must not hold locks or half-published state it cannot lose), with
 * the address in *fault_addr; otherwise fn's own return value goes in *result and MG_OK is
 * returned.  This is how a burst function of the compiled datapath is wrapped. */
int mg_run(int (*fn)(void *ctx), void *ctx, int *result, uint64_t *fault_addr);
/* Read one byte at addr under mg_run: MG_OK if it is readable memory, MG_FAULT (address in
 * *fault_addr) if a registered mapping lost that page. */
int mg_probe(const void *addr, uint64_t *fault_addr);
/* FP-CDEF-END */

/* ---- C users: guard a block in the caller's own frame --------------------------------
 *
 *     struct mg_guard g;
 *     MG_GUARD_BEGIN(g) {
 *         ... touch guest memory ...
 *     } MG_GUARD_RESCUE(g) {
 *         ... g.fault_addr faulted; the block was abandoned ...
 *         return MG_FAULT;
 *     } MG_GUARD_END(g);
 *
 * Locals changed inside the block and read in the rescue branch must be volatile
 * (setjmp rules).  Guards nest; the innermost one catches. */
struct mg_guard {
    sigjmp_buf env;
    struct mg_guard *prev;
    volatile uint64_t fault_addr;
};

void mg_guard_push(struct mg_guard *g);
void mg_guard_pop(struct mg_guard *g);

#define MG_GUARD_BEGIN(g)                 \
    mg_guard_push(&(g));                  \
    if (sigsetjmp((g).env, 0) == 0)
#define MG_GUARD_RESCUE(g) else
#define MG_GUARD_END(g) mg_guard_pop(&(g))

#endif /* VDEV_NATIVE_MEMGUARD_H */
