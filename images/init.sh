#!/bin/busybox sh
# /init of the vdev Linux guest (busybox initramfs). Kept small: every millisecond of boot is
# paid by every end-to-end test under TCG.
#
# Kernel command line options (all optional):
#   vdev.ip=A.B.C.D/NN    address of eth0 (vdev.ip1= for eth1, vdev.ip2= for eth2, ...)
#   vdev.gw=A.B.C.D       default route (via the interface whose subnet holds it)
#   vdev.mtu=N            MTU of eth0 (vdev.mtu1= for eth1, ...)
#   vdev.up=0             leave interfaces without an address down (default: bring all up)
#   vdev.carrier_ms=N     wait up to N ms (default 2000) for carrier on interfaces that
#                         have an address, so tests can send at once after VDEV-READY
#   vdev.halt=1           power off right after VDEV-READY (boot-time measurements)
#   vdev.noshell=1        no console shell after VDEV-READY (init just sleeps)
export PATH=/usr/bin:/usr/sbin:/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /tmp /run
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /dev/shm

# Parse vdev.* options into shell variables vdev_<key> (dots become underscores).
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    vdev.*=*)
        key="${arg%%=*}"; key="${key#vdev.}"
        case "$key" in *[!a-zA-Z0-9_]*) echo "vdev-init: ignoring $arg"; continue;; esac
        eval "vdev_$key=\"\${arg#*=}\""
        ;;
    esac
done

# pfifo_fast instead of Debian's fq_codel: codel drops packets that wait too long (common
# under TCG, or with a slow backend) without telling the sender, which breaks exact packet
# counts. pfifo_fast only tail-drops, and that is reported to the sender as ENOBUFS, which
# vdev-pktgen retries. Must be set before the interfaces are brought up.
echo pfifo_fast > /proc/sys/net/core/default_qdisc

# Modules in dependency order (resolved on the host from each .ko's depends= string).
if [ -s /etc/vdev/modules ]; then
    while read -r mod; do
        insmod "/lib/modules/$mod.ko" || echo "VDEV-MODULE-FAIL $mod"
    done < /etc/vdev/modules
fi

ip link set lo up
ifaces=""
for dev in /sys/class/net/eth*; do
    [ -e "$dev" ] || continue
    name="${dev##*/}"; n="${name#eth}"
    if [ "$n" = 0 ]; then sfx=""; else sfx="$n"; fi
    eval "addr=\"\${vdev_ip$sfx}\"; mtu=\"\${vdev_mtu$sfx}\""
    [ -n "$mtu" ] && ip link set "$name" mtu "$mtu"
    if [ -n "$addr" ] || [ "${vdev_up:-1}" != 0 ]; then ip link set "$name" up; fi
    [ -n "$addr" ] && ip addr add "$addr" dev "$name"
    ifaces="$ifaces${ifaces:+,}$name"
done
# Carrier comes up asynchronously after "ip link set up" (the virtio-net status field,
# linkwatch): wait for it on addressed interfaces, bounded, in 10 ms steps.
waited=0
carrier_ms="${vdev_carrier_ms:-2000}"
for dev in /sys/class/net/eth*; do
    [ -e "$dev" ] || continue
    name="${dev##*/}"; n="${name#eth}"
    if [ "$n" = 0 ]; then sfx=""; else sfx="$n"; fi
    eval "addr=\"\${vdev_ip$sfx}\""
    [ -n "$addr" ] || continue
    while [ "$(cat "$dev/carrier" 2>/dev/null)" != 1 ] && [ "$waited" -lt "$carrier_ms" ]; do
        usleep 10000; waited=$((waited + 10))
    done
done
carriers=""
for dev in /sys/class/net/eth*; do
    [ -e "$dev" ] || continue
    carriers="$carriers${carriers:+,}${dev##*/}:$(cat "$dev/carrier" 2>/dev/null || echo 0)"
done
if [ -n "$vdev_gw" ]; then ip route add default via "$vdev_gw" || echo "VDEV-GW-FAIL $vdev_gw"; fi

echo "VDEV-READY kernel=$(uname -r) ifaces=${ifaces:-none} carrier=${carriers:-none}"
if [ "$vdev_halt" = 1 ]; then poweroff -f; fi
if [ "$vdev_noshell" = 1 ]; then while true; do sleep 3600; done; fi

export PS1='vdev-guest# ' HOME=/root TERM=vt100
cd /root
# The shell gets ttyS0 as controlling tty (cttyhack), so Ctrl-C reaches foreground jobs.
# pid 1 must never exit: restart the shell if it does.
while true; do
    setsid cttyhack sh
    echo "vdev-init: shell exited, restarting"
done
