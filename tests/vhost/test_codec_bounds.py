"""The last accepted and the first refused value of each size bound in the codec.

test_codec_connection.py refuses far-off values (a 1 MiB payload, a 300-byte config); a
bound moved by one (``>`` made ``>=``, ``<`` made ``<=``) passes those.  Mutations killed:
tools/mutants/section5.toml ``codec-*``.
"""

from __future__ import annotations

import pytest

from vdev.vhost import codec
from vdev.vhost.codec import (
    MAX_CONFIG_SIZE,
    MAX_PAYLOAD_SIZE,
    MEMORY_BASELINE_NREGIONS,
    MemRegionDesc,
    ProtocolError,
    Request,
    decode_header,
    decode_request,
    encode_config,
    encode_header,
    encode_mem_table,
)


def test_payload_size_limit_both_ends() -> None:
    assert decode_header(encode_header(1, 0x1, MAX_PAYLOAD_SIZE))[2] == 4096
    with pytest.raises(ProtocolError, match="4097 exceeds the 4096 limit"):
        decode_header(encode_header(1, 0x1, MAX_PAYLOAD_SIZE + 1))


def test_config_size_limit_both_ends() -> None:
    full = decode_request(Request.GET_CONFIG, encode_config(0, 0, bytes(MAX_CONFIG_SIZE)))
    assert isinstance(full, codec.Config) and full.size == 256
    with pytest.raises(ProtocolError) as info:
        decode_request(Request.GET_CONFIG, encode_config(0, 0, bytes(MAX_CONFIG_SIZE + 1)))
    assert info.value.field == "config.size"


def test_config_header_length_both_ends() -> None:
    empty = decode_request(Request.GET_CONFIG, encode_config(0, 0, b""))  # the 12-byte header
    assert empty == codec.Config(0, 0, 0, b"")
    with pytest.raises(ProtocolError, match="config needs >= 12"):
        decode_request(Request.GET_CONFIG, encode_config(0, 0, b"")[:11])


def test_memory_table_lengths_both_ends() -> None:
    none = decode_request(Request.SET_MEM_TABLE, encode_mem_table(()))  # header only: 8 bytes
    assert isinstance(none, codec.MemTable) and none.regions == ()
    with pytest.raises(ProtocolError, match="memory table needs >= 8"):
        decode_request(Request.SET_MEM_TABLE, encode_mem_table(())[:7])
    regions = [MemRegionDesc(i << 30, 1 << 20, i << 31, 0) for i in range(9)]
    eight = decode_request(Request.SET_MEM_TABLE, encode_mem_table(regions[:8]))
    assert isinstance(eight, codec.MemTable) and len(eight.regions) == MEMORY_BASELINE_NREGIONS
    with pytest.raises(ProtocolError, match="9 exceeds 8"):
        decode_request(Request.SET_MEM_TABLE, encode_mem_table(regions))


# Payload sizes from the vhost-user spec's message descriptions ("Message types"), summed
# from the field lists there, not from the codec's struct formats: (request, the name the
# error gives the payload, size).
SPEC_SIZES = [
    (Request.SET_FEATURES, "u64", 8),  # a u64
    (Request.SET_VRING_NUM, "vring state", 4 + 4),  # index, num
    (Request.SET_VRING_ADDR, "vring address", 4 + 4 + 4 * 8),  # index, flags, 4 addresses
    (Request.SET_LOG_BASE, "log description", 8 + 8),  # mmap size, mmap offset
    (Request.ADD_MEM_REG, "single memory region", 8 + 4 * 8),  # padding, one region
    (Request.SET_INFLIGHT_FD, "inflight description", 24),  # 8+8+2+2, C tail padding
    (Request.IOTLB_MSG, "iotlb message", 32),  # 3 u64 + perm + type, padded
    (Request.SET_DEVICE_STATE_FD, "device state transfer", 4 + 4),  # direction, phase
]


@pytest.mark.parametrize(("request_", "what", "size"), SPEC_SIZES, ids=lambda v: str(v))
def test_fixed_payloads_exact_size_only(request_: Request, what: str, size: int) -> None:
    """Each fixed-size payload decodes at exactly its spec size, and one byte less or more is
    a ProtocolError naming the request, the field (``size``) and both sizes.  Kills the
    request or field dropped from the error (mutmut: codec ``_fixed``/``_need``) and a
    renamed payload."""
    decode_request(request_, bytes(size))
    for n in (size - 1, size + 1):
        with pytest.raises(ProtocolError) as ei:
            decode_request(request_, bytes(n))
        e = ei.value
        assert (e.request, e.field) == (request_, "size")
        assert e.detail == f"payload is {n} bytes, {what} needs {size}"
        assert str(e) == f"VHOST_USER_{request_.name}: size: {e.detail}"  # the spec's name


def test_config_and_request_errors_name_their_field() -> None:
    with pytest.raises(ProtocolError) as ei:
        decode_request(Request.GET_CONFIG, encode_config(0, 0, b"", size=MAX_CONFIG_SIZE + 1))
    assert (ei.value.request, ei.value.field) == (Request.GET_CONFIG, "config.size")
    with pytest.raises(ProtocolError) as ei:
        decode_request(0x7FFF, b"")
    assert (ei.value.request, ei.value.field) == (0x7FFF, "request")
    assert ei.value.detail == "unknown request number"


@pytest.mark.parametrize("n", [0, 8, 4, 1, 16])
def test_empty_payload_is_0_or_a_zero_u64(n: int) -> None:
    """Requests without a payload take 0 bytes (QEMU) or a u64 (some front-ends, as
    libvhost-user accepts); any other size is named."""
    if n in (0, 8):
        decode_request(Request.GET_FEATURES, bytes(n))
        return
    with pytest.raises(ProtocolError) as ei:
        decode_request(Request.GET_FEATURES, bytes(n))
    assert (ei.value.field, ei.value.detail) == ("size", f"payload is {n} bytes, need 0")
