/* vdev-pktgen: send an EXACT number of frames from inside the guest, over a UDP socket or a
 * raw AF_PACKET socket, so end-to-end tests can compare counters on both sides.
 *
 *   vdev-pktgen --udp DST:PORT --count N --size S [--src-port P] [--interval-us U]
 *   vdev-pktgen --raw IFACE --dst-mac MAC --count N --size S [--src-mac MAC]
 *               [--ethertype 0x88b5] [--interval-us U]
 *
 * --size is the UDP payload size (UDP mode) or the Ethernet frame length without FCS (raw
 * mode). Transient send errors (ENOBUFS, EAGAIN) are retried so that "sent" means handed to
 * the kernel; other errors are counted and reported. Prints one line on stdout:
 *   pktgen tx_packets=N tx_bytes=B errors=E elapsed_us=T pps=P async_errors=A
 * (async_errors: ICMP errors for earlier UDP datagrams, e.g. port unreachable; the datagram
 * whose send reported one is sent again, so tx_packets stays exact.)
 * Exit status: 0 when all N were sent, 1 when some failed, 2 on usage/setup errors. */
#define _GNU_SOURCE
#include "vdev_tools.h"

#include <arpa/inet.h>
#include <getopt.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

static const char *prog = "vdev-pktgen";
static unsigned long long async_errors; /* ICMP errors reported for earlier datagrams */

static void usage(void)
{
	fprintf(stderr,
		"usage: %s --udp DST:PORT --count N --size S [--src-port P] [--interval-us U]\n"
		"       %s --raw IFACE --dst-mac MAC --count N --size S [--src-mac MAC]\n"
		"                  [--ethertype T] [--interval-us U]\n",
		prog, prog);
	exit(2);
}

/* Retry transient errors so the packet count is exact; give up after ~5 s of no progress. */
static int send_retry(int fd, const void *buf, size_t len, const struct sockaddr *sa,
		      socklen_t salen)
{
	uint64_t deadline = vdev_now_us() + 5000000u;
	for (;;) {
		ssize_t n = sendto(fd, buf, len, 0, sa, salen);
		if (n == (ssize_t)len)
			return 0;
		if (n >= 0)
			return -1;
		if (errno == EINTR)
			continue;
		if ((errno == ECONNREFUSED || errno == EHOSTUNREACH || errno == ENETUNREACH) &&
		    vdev_now_us() < deadline) {
			/* An ICMP error for an EARLIER datagram (reported because of IP_RECVERR);
			 * this one was not sent. Drain the error queue and send it again. */
			char cbuf[512];
			struct msghdr mh = {.msg_control = cbuf, .msg_controllen = sizeof(cbuf)};
			while (recvmsg(fd, &mh, MSG_ERRQUEUE | MSG_DONTWAIT) >= 0)
				mh.msg_controllen = sizeof(cbuf);
			async_errors++;
			continue;
		}
		if ((errno == ENOBUFS || errno == EAGAIN) && vdev_now_us() < deadline) {
			struct pollfd p = {.fd = fd, .events = POLLOUT};
			poll(&p, 1, 1);
			continue;
		}
		return -1;
	}
}

int main(int argc, char **argv)
{
	const char *udp = NULL, *raw = NULL, *dst_mac_s = NULL, *src_mac_s = NULL;
	unsigned long long count = 1, size = 64, src_port = 0, interval_us = 0;
	unsigned long long ethertype = VDEV_ETHERTYPE;
	static const struct option opts[] = {
		{"udp", required_argument, NULL, 'u'},
		{"raw", required_argument, NULL, 'r'},
		{"dst-mac", required_argument, NULL, 'd'},
		{"src-mac", required_argument, NULL, 's'},
		{"count", required_argument, NULL, 'c'},
		{"size", required_argument, NULL, 'z'},
		{"src-port", required_argument, NULL, 'p'},
		{"ethertype", required_argument, NULL, 'e'},
		{"interval-us", required_argument, NULL, 'i'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	int c;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'u': udp = optarg; break;
		case 'r': raw = optarg; break;
		case 'd': dst_mac_s = optarg; break;
		case 's': src_mac_s = optarg; break;
		case 'c': count = vdev_num(prog, "--count", optarg); break;
		case 'z': size = vdev_num(prog, "--size", optarg); break;
		case 'p': src_port = vdev_num(prog, "--src-port", optarg); break;
		case 'e': ethertype = vdev_num(prog, "--ethertype", optarg); break;
		case 'i': interval_us = vdev_num(prog, "--interval-us", optarg); break;
		default: usage();
		}
	}
	if (optind != argc || (!udp == !raw))
		usage();

	int fd;
	size_t hdr = 0;
	struct sockaddr_storage ss;
	socklen_t salen;
	memset(&ss, 0, sizeof(ss));
	static uint8_t buf[65536];
	memset(buf, 0, sizeof(buf));

	if (udp) {
		char host[256];
		const char *colon = strrchr(udp, ':');
		if (!colon || (size_t)(colon - udp) >= sizeof(host))
			vdev_die(prog, "--udp wants DST:PORT");
		memcpy(host, udp, (size_t)(colon - udp));
		host[colon - udp] = '\0';
		unsigned long long port = vdev_num(prog, "--udp port", colon + 1);
		struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
		sin->sin_family = AF_INET;
		sin->sin_port = htons((uint16_t)port);
		if (port > 65535 || inet_pton(AF_INET, host, &sin->sin_addr) != 1)
			vdev_die(prog, "--udp wants an IPv4 DST:PORT");
		salen = sizeof(*sin);
		if (size < sizeof(struct vdev_payload) || size > 65507)
			vdev_die(prog, "--size must be 8..65507 in UDP mode");
		fd = socket(AF_INET, SOCK_DGRAM, 0);
		if (fd < 0)
			vdev_die(prog, strerror(errno));
		/* Without IP_RECVERR, UDP hides qdisc drops (ENOBUFS) from the sender, and the
		 * count would silently be short. With it, send_retry sees and retries them. */
		int one = 1;
		setsockopt(fd, IPPROTO_IP, IP_RECVERR, &one, sizeof(one));
		if (src_port) {
			struct sockaddr_in b = {.sin_family = AF_INET,
						.sin_port = htons((uint16_t)src_port)};
			if (bind(fd, (struct sockaddr *)&b, sizeof(b)) < 0)
				vdev_die(prog, strerror(errno));
		}
	} else {
		uint8_t dst[6], src[6];
		if (!dst_mac_s || vdev_parse_mac(dst_mac_s, dst) < 0)
			vdev_die(prog, "--raw needs --dst-mac aa:bb:cc:dd:ee:ff");
		if (size < 14 + sizeof(struct vdev_payload) || size > 65535)
			vdev_die(prog, "--size must be 22..65535 in raw mode");
		unsigned int ifindex = if_nametoindex(raw);
		if (ifindex == 0)
			vdev_die(prog, "no such interface");
		fd = socket(AF_PACKET, SOCK_RAW, 0); /* protocol 0: send only, receive nothing */
		if (fd < 0)
			vdev_die(prog, strerror(errno));
		if (src_mac_s) {
			if (vdev_parse_mac(src_mac_s, src) < 0)
				vdev_die(prog, "bad --src-mac");
		} else {
			struct ifreq ifr;
			memset(&ifr, 0, sizeof(ifr));
			snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", raw);
			if (ioctl(fd, SIOCGIFHWADDR, &ifr) < 0)
				vdev_die(prog, strerror(errno));
			memcpy(src, ifr.ifr_hwaddr.sa_data, 6);
		}
		struct sockaddr_ll *sll = (struct sockaddr_ll *)&ss;
		sll->sll_family = AF_PACKET;
		sll->sll_ifindex = (int)ifindex;
		sll->sll_halen = 6;
		memcpy(sll->sll_addr, dst, 6);
		salen = sizeof(*sll);
		memcpy(buf, dst, 6);
		memcpy(buf + 6, src, 6);
		buf[12] = (uint8_t)(ethertype >> 8);
		buf[13] = (uint8_t)ethertype;
		hdr = 14;
	}
	/* A recognizable fill pattern after the header helps when reading captures. */
	for (size_t i = hdr + sizeof(struct vdev_payload); i < size; i++)
		buf[i] = (uint8_t)i;

	unsigned long long sent = 0, bytes = 0, errors = 0;
	uint64_t start = vdev_now_us();
	for (unsigned long long i = 0; i < count; i++) {
		struct vdev_payload p = {htonl(VDEV_MAGIC), htonl((uint32_t)i)};
		memcpy(buf + hdr, &p, sizeof(p));
		if (send_retry(fd, buf, (size_t)size, (struct sockaddr *)&ss, salen) == 0) {
			sent++;
			bytes += size;
		} else {
			if (errors == 0)
				fprintf(stderr, "%s: send: %s\n", prog, strerror(errno));
			errors++;
		}
		if (interval_us)
			usleep((useconds_t)interval_us);
	}
	uint64_t elapsed = vdev_now_us() - start;
	unsigned long long pps = elapsed ? sent * 1000000ull / elapsed : 0;
	printf("pktgen tx_packets=%llu tx_bytes=%llu errors=%llu elapsed_us=%llu pps=%llu "
	       "async_errors=%llu\n",
	       sent, bytes, errors, (unsigned long long)elapsed, pps, async_errors);
	close(fd);
	return errors ? 1 : 0;
}
