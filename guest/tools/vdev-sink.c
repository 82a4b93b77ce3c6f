/* vdev-sink: count the frames vdev-pktgen sent (matching magic only), over a UDP socket or a
 * raw AF_PACKET socket, and print parseable counters.
 *
 *   vdev-sink --udp PORT [--bind ADDR] [--count N] [--timeout-ms T]
 *   vdev-sink --raw IFACE [--ethertype 0x88b5] [--count N] [--timeout-ms T]
 *
 * Prints "sink ready" once the socket is bound (so a shell can start the sender only after
 * that), then, when N matching packets arrived or T ms passed, one line:
 *   sink rx_packets=N rx_bytes=B other=O dups=D out_of_order=R drops=K elapsed_us=T
 * rx_bytes counts UDP payload bytes (UDP mode) or frame bytes without FCS (raw mode);
 * "other" counts packets without the vdev magic; "drops" is the kernel's socket drop count
 * (raw mode: PACKET_STATISTICS; UDP mode: SO_RXQ_OVFL).
 * Exit status: 0 when N were received (or N is 0 and the timeout passed), 1 on timeout
 * before N, 2 on usage/setup errors. */
#define _GNU_SOURCE
#include "vdev_tools.h"

#include <arpa/inet.h>
#include <getopt.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

static const char *prog = "vdev-sink";

static void usage(void)
{
	fprintf(stderr,
		"usage: %s --udp PORT [--bind ADDR] [--count N] [--timeout-ms T]\n"
		"       %s --raw IFACE [--ethertype T] [--count N] [--timeout-ms T]\n",
		prog, prog);
	exit(2);
}

#define SEEN_MAX (1u << 20) /* sequence numbers tracked for duplicate detection */
static uint8_t seen[SEEN_MAX / 8];

int main(int argc, char **argv)
{
	const char *raw = NULL, *bind_addr = "0.0.0.0";
	long long udp_port = -1;
	unsigned long long count = 0, timeout_ms = 10000, ethertype = VDEV_ETHERTYPE;
	static const struct option opts[] = {
		{"udp", required_argument, NULL, 'u'},
		{"raw", required_argument, NULL, 'r'},
		{"bind", required_argument, NULL, 'b'},
		{"count", required_argument, NULL, 'c'},
		{"timeout-ms", required_argument, NULL, 't'},
		{"ethertype", required_argument, NULL, 'e'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	int c;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'u': udp_port = (long long)vdev_num(prog, "--udp", optarg); break;
		case 'r': raw = optarg; break;
		case 'b': bind_addr = optarg; break;
		case 'c': count = vdev_num(prog, "--count", optarg); break;
		case 't': timeout_ms = vdev_num(prog, "--timeout-ms", optarg); break;
		case 'e': ethertype = vdev_num(prog, "--ethertype", optarg); break;
		default: usage();
		}
	}
	if (optind != argc || ((udp_port < 0) == !raw) || udp_port > 65535)
		usage();

	int fd;
	size_t hdr = 0;
	int one = 1;
	if (raw) {
		unsigned int ifindex = if_nametoindex(raw);
		if (ifindex == 0)
			vdev_die(prog, "no such interface");
		uint16_t proto = htons((uint16_t)ethertype);
		fd = socket(AF_PACKET, SOCK_RAW, proto);
		if (fd < 0)
			vdev_die(prog, strerror(errno));
		struct sockaddr_ll sll = {.sll_family = AF_PACKET,
					  .sll_protocol = proto,
					  .sll_ifindex = (int)ifindex};
		if (bind(fd, (struct sockaddr *)&sll, sizeof(sll)) < 0)
			vdev_die(prog, strerror(errno));
		hdr = 14;
	} else {
		fd = socket(AF_INET, SOCK_DGRAM, 0);
		if (fd < 0)
			vdev_die(prog, strerror(errno));
		struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)udp_port)};
		if (inet_pton(AF_INET, bind_addr, &sin.sin_addr) != 1)
			vdev_die(prog, "--bind wants an IPv4 address");
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		setsockopt(fd, SOL_SOCKET, SO_RXQ_OVFL, &one, sizeof(one));
		if (bind(fd, (struct sockaddr *)&sin, sizeof(sin)) < 0)
			vdev_die(prog, strerror(errno));
	}
	/* A big receive buffer keeps bursts on lo from being dropped (FORCE works as root). */
	int rcvbuf = 8 << 20;
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf)) < 0)
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
	printf("sink ready\n");
	fflush(stdout);

	static uint8_t buf[65536];
	char cbuf[CMSG_SPACE(sizeof(uint32_t)) + CMSG_SPACE(sizeof(struct tpacket_auxdata))];
	unsigned long long rx = 0, bytes = 0, other = 0, dups = 0, ooo = 0, drops = 0;
	long long last_seq = -1;
	uint64_t start = vdev_now_us();
	uint64_t deadline = start + timeout_ms * 1000u;
	int status = 0;
	while (count == 0 || rx < count) {
		uint64_t now = vdev_now_us();
		if (now >= deadline) {
			status = count ? 1 : 0;
			break;
		}
		struct pollfd p = {.fd = fd, .events = POLLIN};
		int left = (int)((deadline - now + 999) / 1000);
		int r = poll(&p, 1, left);
		if (r < 0 && errno != EINTR)
			vdev_die(prog, strerror(errno));
		if (r <= 0)
			continue;
		struct sockaddr_ll from;
		struct iovec iov = {.iov_base = buf, .iov_len = sizeof(buf)};
		struct msghdr mh = {.msg_name = &from,
				    .msg_namelen = sizeof(from),
				    .msg_iov = &iov,
				    .msg_iovlen = 1,
				    .msg_control = cbuf,
				    .msg_controllen = sizeof(cbuf)};
		ssize_t n = recvmsg(fd, &mh, MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			vdev_die(prog, strerror(errno));
		}
		for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
			if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SO_RXQ_OVFL) {
				uint32_t d;
				memcpy(&d, CMSG_DATA(cm), sizeof(d));
				drops = d;
			}
		}
		/* Frames we sent ourselves are looped back to packet sockets: skip them. */
		if (raw && from.sll_pkttype == PACKET_OUTGOING)
			continue;
		struct vdev_payload pl;
		if ((size_t)n < hdr + sizeof(pl)) {
			other++;
			continue;
		}
		memcpy(&pl, buf + hdr, sizeof(pl));
		if (ntohl(pl.magic) != VDEV_MAGIC) {
			other++;
			continue;
		}
		uint32_t seq = ntohl(pl.seq);
		if (seq < SEEN_MAX) {
			if (seen[seq / 8] & (1u << (seq % 8))) {
				dups++;
				continue;
			}
			seen[seq / 8] |= (uint8_t)(1u << (seq % 8));
		}
		if ((long long)seq < last_seq)
			ooo++;
		last_seq = seq;
		rx++;
		bytes += (unsigned long long)n;
	}
	if (raw) {
		struct tpacket_stats st;
		socklen_t sl = sizeof(st);
		if (getsockopt(fd, SOL_PACKET, PACKET_STATISTICS, &st, &sl) == 0)
			drops = st.tp_drops;
	}
	uint64_t elapsed = vdev_now_us() - start;
	printf("sink rx_packets=%llu rx_bytes=%llu other=%llu dups=%llu out_of_order=%llu "
	       "drops=%llu elapsed_us=%llu\n",
	       rx, bytes, other, dups, ooo, drops, (unsigned long long)elapsed);
	close(fd);
	return status;
}
