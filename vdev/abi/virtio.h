/*
 * vdev virtio ABI: split-ring and virtio-net layouts shared by the host
 * (cffi, through vdev/abi/__init__.py) and the freestanding guest driver.
 * Field names and bit numbers follow the virtio 1.x specification,
 * sections "Virtqueues" (2.7 Split Virtqueues, 2.8 Packed Virtqueues) and
 * "Network Device".
 * All fields are little endian (VERSION_1 or x86 legacy).
 */
#ifndef VDEV_ABI_VIRTIO_H
#define VDEV_ABI_VIRTIO_H

#include "skywalk.h"

/* CDEF-BEGIN */
/* 2.7.5 The Virtqueue Descriptor Table */
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
/* 2.7.6 The Virtqueue Available Ring */
#define VRING_AVAIL_F_NO_INTERRUPT 1
/* 2.7.8 The Virtqueue Used Ring */
#define VRING_USED_F_NO_NOTIFY 1

/* 2.8.1 Driver and Device Ring Wrap Counters: flag bit numbers in
 * struct vring_packed_desc.flags (NEXT, WRITE, INDIRECT as above) */
#define VRING_PACKED_DESC_F_AVAIL 7
#define VRING_PACKED_DESC_F_USED 15
/* 2.8.10 Event Suppression Structure Format: vring_packed_desc_event.flags */
#define VRING_PACKED_EVENT_FLAG_ENABLE 0
#define VRING_PACKED_EVENT_FLAG_DISABLE 1
#define VRING_PACKED_EVENT_FLAG_DESC 2
#define VRING_PACKED_EVENT_F_WRAP_CTR 15

/* 6 Reserved Feature Bits */
#define VIRTIO_F_NOTIFY_ON_EMPTY 24
#define VIRTIO_F_ANY_LAYOUT 27
#define VIRTIO_RING_F_INDIRECT_DESC 28
#define VIRTIO_RING_F_EVENT_IDX 29
#define VHOST_USER_F_PROTOCOL_FEATURES 30
#define VIRTIO_F_VERSION_1 32
#define VIRTIO_F_ACCESS_PLATFORM 33
#define VIRTIO_F_RING_PACKED 34
#define VIRTIO_F_IN_ORDER 35

/* 5.1.3 Network device Feature bits */
#define VIRTIO_NET_F_CSUM 0
#define VIRTIO_NET_F_GUEST_CSUM 1
#define VIRTIO_NET_F_MTU 3
#define VIRTIO_NET_F_MAC 5
#define VIRTIO_NET_F_GUEST_TSO4 7
#define VIRTIO_NET_F_GUEST_TSO6 8
#define VIRTIO_NET_F_GUEST_ECN 9
#define VIRTIO_NET_F_GUEST_UFO 10
#define VIRTIO_NET_F_HOST_TSO4 11
#define VIRTIO_NET_F_HOST_TSO6 12
#define VIRTIO_NET_F_HOST_ECN 13
#define VIRTIO_NET_F_HOST_UFO 14
#define VIRTIO_NET_F_MRG_RXBUF 15
#define VIRTIO_NET_F_STATUS 16
#define VIRTIO_NET_F_CTRL_VQ 17
#define VIRTIO_NET_F_MQ 22

/* 5.1.4 Device configuration layout: status */
#define VIRTIO_NET_S_LINK_UP 1

/* 5.1.6 virtio_net_hdr flags and gso types */
#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1
#define VIRTIO_NET_HDR_F_DATA_VALID 2
#define VIRTIO_NET_HDR_GSO_NONE 0
#define VIRTIO_NET_HDR_GSO_TCPV4 1
#define VIRTIO_NET_HDR_GSO_UDP 3
#define VIRTIO_NET_HDR_GSO_TCPV6 4
#define VIRTIO_NET_HDR_GSO_ECN 0x80

/* 4.1.4.8 Legacy Interfaces: A Note on PCI Device Layout (I/O BAR0) */
#define VIRTIO_PCI_HOST_FEATURES 0
#define VIRTIO_PCI_GUEST_FEATURES 4
#define VIRTIO_PCI_QUEUE_PFN 8
#define VIRTIO_PCI_QUEUE_NUM 12
#define VIRTIO_PCI_QUEUE_SEL 14
#define VIRTIO_PCI_QUEUE_NOTIFY 16
#define VIRTIO_PCI_STATUS 18
#define VIRTIO_PCI_ISR 19
#define VIRTIO_PCI_CONFIG_NO_MSIX 20
#define VIRTIO_MSI_CONFIG_VECTOR 20     /* only while MSI-X is enabled */
#define VIRTIO_MSI_QUEUE_VECTOR 22
#define VIRTIO_PCI_CONFIG_MSIX 24
#define VIRTIO_MSI_NO_VECTOR 0xffff
/* 4.1.4.5 ISR status: bit 0 a used buffer, bit 1 a configuration change */
#define VIRTIO_PCI_ISR_QUEUE 1
#define VIRTIO_PCI_ISR_CONFIG 2

/* 5.1.6.5 Control Virtqueue */
#define VIRTIO_NET_OK 0
#define VIRTIO_NET_ERR 1
#define VIRTIO_NET_CTRL_MQ 4
#define VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 0

/* 2.1 Device Status Field */
#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 64
#define VIRTIO_STATUS_FAILED 128

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vring_avail_hdr {
    uint16_t flags;
    uint16_t idx;
    /* uint16_t ring[num]; uint16_t used_event (EVENT_IDX) */
};

struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};

struct vring_used_hdr {
    uint16_t flags;
    uint16_t idx;
    /* struct vring_used_elem ring[num]; uint16_t avail_event (EVENT_IDX) */
};

/* 2.8.13 Packed Virtqueue Descriptor */
struct vring_packed_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t id;                         /* buffer id, echoed by the device when used */
    uint16_t flags;
};

/* 2.8.10 Event Suppression Structure Format */
struct vring_packed_desc_event {
    uint16_t off_wrap;                   /* descriptor offset | wrap counter << 15 */
    uint16_t flags;                      /* VRING_PACKED_EVENT_FLAG_* */
};

/* 5.1.6 Device Operation: header with MRG_RXBUF or VERSION_1 (12 bytes). */
struct virtio_net_hdr_mrg {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
    uint16_t num_buffers;
};

/* 5.1.4 Device configuration layout */
struct virtio_net_config {
    uint8_t mac[6];
    uint16_t status;
    uint16_t max_virtqueue_pairs;
    uint16_t mtu;
};
/* CDEF-END */

#ifndef VDEV_CFFI
typedef char vdev_vring_desc_size[(sizeof(struct vring_desc) == 16) ? 1 : -1];
typedef char vdev_net_hdr_size[(sizeof(struct virtio_net_hdr_mrg) == 12) ? 1 : -1];
typedef char vdev_packed_desc_size[(sizeof(struct vring_packed_desc) == 16) ? 1 : -1];
typedef char vdev_packed_event_size[(sizeof(struct vring_packed_desc_event) == 4) ? 1 : -1];
#endif

#endif /* VDEV_ABI_VIRTIO_H */
