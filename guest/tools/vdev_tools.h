/* Shared helpers for the vdev guest tools: argument parsing, time, MAC parsing, and the
 * payload layout both tools agree on. The tools are built with `gcc -static` and copied
 * into the guest initramfs, so they must not depend on anything but libc. */
#ifndef VDEV_TOOLS_H
#define VDEV_TOOLS_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Every generated payload starts with this header so the sink counts only our packets
 * (slirp, ARP, IPv6 noise on the same interface must not be miscounted). */
#define VDEV_MAGIC 0x56444556u /* "VDEV" */
#define VDEV_ETHERTYPE 0x88b5  /* IEEE 802 local experimental ethertype */

struct vdev_payload {
	uint32_t magic; /* network order VDEV_MAGIC */
	uint32_t seq;   /* network order, 0..count-1 */
};

static inline uint64_t vdev_now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static inline void vdev_die(const char *prog, const char *msg)
{
	fprintf(stderr, "%s: %s\n", prog, msg);
	exit(2);
}

static inline unsigned long long vdev_num(const char *prog, const char *opt, const char *s)
{
	char *end = NULL;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno != 0 || end == s || *end != '\0') {
		fprintf(stderr, "%s: bad number for %s: '%s'\n", prog, opt, s);
		exit(2);
	}
	return v;
}

/* Parse "aa:bb:cc:dd:ee:ff"; returns 0 on success. */
static inline int vdev_parse_mac(const char *s, uint8_t mac[6])
{
	unsigned int b[6];
	char extra;
	if (sscanf(s, "%x:%x:%x:%x:%x:%x%c", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5], &extra) !=
	    6)
		return -1;
	for (int i = 0; i < 6; i++) {
		if (b[i] > 0xff)
			return -1;
		mac[i] = (uint8_t)b[i];
	}
	return 0;
}

#endif
