"""The codec's bytes on the wire and the words of its refusals, against the spec's layout.

The oracle is the spec's struct layout written out with :mod:`struct` here, not the codec's
own structs (vhost-user.rst, "Message Specification": native byte order, packed;
"Header": u32 request, u32 flags, u32 size; "Memory regions description": u32 num_regions,
u32 padding, then the regions; "Single memory region description": u64 padding, then the
region; "Log description": u64 mmap_size, u64 mmap_offset).  Padding is sent as zero, as
QEMU sends it.

Mutations killed (mutmut, ``vdev.vhost.codec``): ``encode_message`` and ``encode_log``
(no test called them: the front-end side builds its messages with ``encode_header``), the
padding of ``encode_mem_table`` and ``encode_mem_reg`` made 1, and the request number or
the detail dropped from the refusals of ``decode_config`` and ``decode_mem_table``, and
``pf_mask`` starting from 1 or keeping only the last bit (its callers ran it at import time
or with one bit), ``check_fds``'s refusal naming another request or field or saying "1..1",
a one-fd request allowed two (no test attached a second fd to such a request), and the
words of ``decode_header``'s refusals (request, field, detail of each).
"""

from __future__ import annotations

import struct

import pytest

from vdev.vhost.codec import (
    VERSION,
    Empty,
    Log,
    MemRegionDesc,
    ProtocolError,
    ProtocolFeature,
    Request,
    check_fds,
    decode_header,
    decode_request,
    encode_config,
    encode_log,
    encode_mem_reg,
    encode_mem_table,
    encode_message,
    pf_mask,
)

REGIONS = [
    MemRegionDesc(0x0, 0x10000, 0x7F00_0000_0000, 0),
    MemRegionDesc(0x100000, 0x20000, 0x7F00_1000_0000, 0x1000),
]


def region_bytes(r: MemRegionDesc) -> bytes:
    return struct.pack("=QQQQ", r.gpa, r.size, r.uva, r.mmap_offset)


@pytest.mark.parametrize(
    ("request_", "payload", "flags"),
    [(Request.GET_FEATURES, b"", VERSION), (Request.SET_FEATURES, bytes(range(8)), 0x9)],
)
def test_encode_message_is_the_header_then_the_payload(
    request_: int, payload: bytes, flags: int
) -> None:
    wire = encode_message(request_, payload, flags)
    assert wire == struct.pack("=III", request_, flags, len(payload)) + payload
    assert decode_header(wire[:12]) == (request_, flags, len(payload))


def test_encode_message_defaults_to_an_empty_version_1_request() -> None:
    assert encode_message(Request.SET_OWNER) == struct.pack("=III", Request.SET_OWNER, 1, 0)


def test_encode_log_is_size_then_offset() -> None:
    wire = encode_log(Log(0x12345, 0x678))
    assert wire == struct.pack("=QQ", 0x12345, 0x678)
    assert decode_request(Request.SET_LOG_BASE, wire) == Log(0x12345, 0x678)


def test_memory_table_padding_is_zero() -> None:
    wire = encode_mem_table(REGIONS)
    assert wire == struct.pack("=II", 2, 0) + b"".join(region_bytes(r) for r in REGIONS)


def test_single_region_padding_is_zero() -> None:
    assert encode_mem_reg(REGIONS[1]) == bytes(8) + region_bytes(REGIONS[1])


def test_config_refusals_name_the_request_and_say_why() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(Request.SET_CONFIG, bytes(11))
    assert info.value.request == Request.SET_CONFIG
    assert str(info.value) == (
        "VHOST_USER_SET_CONFIG: size: payload is 11 bytes, config needs >= 12"
    )
    with pytest.raises(ProtocolError) as info:
        decode_request(Request.GET_CONFIG, struct.pack("=III", 0, 257, 0) + bytes(257))
    assert str(info.value) == "VHOST_USER_GET_CONFIG: config.size: 257 exceeds 256"
    with pytest.raises(ProtocolError) as info:
        decode_request(Request.GET_CONFIG, encode_config(0, 0, bytes(4), size=6))
    assert str(info.value) == (
        "VHOST_USER_GET_CONFIG: size: payload is 16 bytes, config of 6 bytes needs 18"
    )


def test_memory_table_size_refusal_says_how_many_regions_need_what() -> None:
    wire = encode_mem_table(REGIONS) + bytes(4)
    with pytest.raises(ProtocolError) as info:
        decode_request(Request.SET_MEM_TABLE, wire)
    assert str(info.value) == (
        f"VHOST_USER_SET_MEM_TABLE: size: payload is {len(wire)} bytes, 2 regions need 72"
    )


def test_pf_mask_is_the_or_of_its_bits() -> None:
    assert pf_mask() == 0
    assert pf_mask(ProtocolFeature.REPLY_ACK) == 1 << 3
    bits = [ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.STATUS]
    assert pf_mask(*bits) == sum(1 << int(b) for b in bits) == 0x10009


def test_a_missing_fd_is_refused_naming_request_field_and_count() -> None:
    with pytest.raises(ProtocolError) as info:
        check_fds(Request.SET_VRING_KICK, 0, 0)  # bit 8 clear: "one fd"
    assert (info.value.request, info.value.field) == (Request.SET_VRING_KICK, "fds")
    assert str(info.value) == "VHOST_USER_SET_VRING_KICK: fds: missing fd: 0 attached, need 1"


@pytest.mark.parametrize("request_", [Request.SET_LOG_FD, Request.SET_BACKEND_REQ_FD])
def test_a_request_of_exactly_one_fd_refuses_a_second(request_: int) -> None:
    check_fds(request_, Empty(), 1)
    with pytest.raises(ProtocolError) as info:
        check_fds(request_, Empty(), 2)
    assert (info.value.request, info.value.field) == (request_, "fds")
    assert str(info.value).endswith("fds: extra fd: 2 attached, need 1")


@pytest.mark.parametrize(
    ("data", "expect_reply", "request_", "field", "text"),
    [
        (bytes(11), False, "header", "size", "header: size: 11 bytes, need 12"),
        (bytes(13), False, "header", "size", "header: size: 13 bytes, need 12"),
        (
            struct.pack("=III", 1, 0x2, 0),
            False,
            1,
            "flags",
            "VHOST_USER_GET_FEATURES: flags: version 2, need 1",
        ),
        (
            struct.pack("=III", 2, 0x11, 0),
            False,
            2,
            "flags",
            "VHOST_USER_SET_FEATURES: flags: unknown flag bits 0x10",
        ),
        (
            struct.pack("=III", 3, 0x5, 0),
            False,
            3,
            "flags",
            "VHOST_USER_SET_OWNER: flags: reply bit set on a request",
        ),
        (
            struct.pack("=III", 1, 0x1, 8),
            True,
            1,
            "flags",
            "VHOST_USER_GET_FEATURES: flags: reply bit missing on a reply",
        ),
        (
            struct.pack("=III", 99, 0x1, 4097),
            False,
            99,
            "size",
            "request 99: size: 4097 exceeds the 4096 limit",
        ),
    ],
)
def test_header_refusals_name_request_field_and_detail(
    data: bytes, expect_reply: bool, request_: int | str, field: str, text: str
) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_header(data, expect_reply=expect_reply)
    assert (info.value.request, info.value.field, str(info.value)) == (request_, field, text)
