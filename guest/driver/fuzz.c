/* Fuzzing support: BUG lines and an edge-coverage map the host reads from RAM.
 *
 * BUG_ON (driver.h) reports through drv_bug: one console line per hit and a
 * counter (`vdev_bugs`), exported for the host like vdev_stats.
 *
 * Coverage: the coverage builds (images/bare.py, variant "cov") compile the
 * driver's logic (virtq.c, net.c, channel.c) with
 * -fsanitize-coverage=trace-pc, so GCC calls __sanitizer_cov_trace_pc at the
 * start of every basic block.  (Clang's trace-pc-guard, with one counter per
 * edge, is not in GCC 12; trace-pc gives the block's address instead.)  This
 * file keeps an AFL-style edge map: the pair (previous block, this block) is
 * hashed into vdev_cov_map[VDEV_COV_SIZE], one saturating u8 hit counter per
 * slot.  The host reads the map straight out of guest RAM through the ELF
 * symbol (no agent in the guest): host/fuzz_target.py.  This file itself is
 * not instrumented (it would recurse).  Builds without the flag never call it.
 */
#include "driver.h"

#define VDEV_COV_SIZE 8192               /* power of 2: the edge hash is masked */

uint32_t vdev_bugs;
uint8_t vdev_cov_map[VDEV_COV_SIZE] __attribute__((aligned(64)));
uint32_t vdev_cov_size = VDEV_COV_SIZE;
static uint32_t cov_prev;

int drv_bug(const char *file, int line, const char *what, uint32_t a, uint32_t b)
{
    vdev_bugs++;
    const char *base = file;
    for (const char *p = file; *p; p++)
        if (*p == '/')
            base = p + 1;
    kprintf("BUG: %s a=%u b=%u at %s:%d\n", what, a, b, base, line);
    return 1;
}

void __sanitizer_cov_trace_pc(void);
void __sanitizer_cov_trace_pc(void)
{
    uint32_t pc = (uint32_t)(uintptr_t)__builtin_return_address(0);
    uint32_t cur = (pc ^ (pc >> 9)) & (VDEV_COV_SIZE - 1);
    uint32_t i = cur ^ cov_prev;
    if (vdev_cov_map[i] != 0xff)
        vdev_cov_map[i]++;
    cov_prev = cur >> 1;
}
