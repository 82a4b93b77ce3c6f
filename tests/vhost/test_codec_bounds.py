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
