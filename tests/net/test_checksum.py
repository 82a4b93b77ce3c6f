"""vdev.net.checksum against independent oracles: dpkt's in_cksum and a word-by-word RFC 1071
sum, on data that carries (0xff runs), odd lengths and random bytes."""

from __future__ import annotations

import struct

import dpkt
from hypothesis import given
from hypothesis import strategies as st

from vdev.net.checksum import complete_checksum, ones_complement_sum
from vdev.net.responder import inet_checksum


def rfc1071_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    acc = 0
    for i in range(0, len(data), 2):
        acc += (data[i] << 8) | data[i + 1]
        acc = (acc & 0xFFFF) + (acc >> 16)  # end-around carry, at every step
    return acc


data_st = st.one_of(
    st.binary(max_size=300),
    st.integers(1, 400).map(lambda n: b"\xff" * n),  # a carry on almost every word
    st.lists(st.sampled_from([b"\xff\xff", b"\x80\x00", b"\x00\x01"]), max_size=100).map(b"".join),
)


@given(data_st)
def test_sum_and_checksum_match_the_oracles(data: bytes) -> None:
    assert ones_complement_sum(data) == rfc1071_sum(data)
    assert inet_checksum(data) == dpkt.in_cksum(data)


def test_known_carry_case() -> None:
    """Three words whose sum carries twice: 0xffff + 0xffff + 0x0003 = 0x20001 -> 0x0003."""
    data = struct.pack("!HHH", 0xFFFF, 0xFFFF, 0x0003)
    assert ones_complement_sum(data) == 0x0003 == rfc1071_sum(data)
    assert inet_checksum(data) == 0xFFFC == dpkt.in_cksum(data)


@given(st.binary(min_size=8, max_size=200))
def test_completed_checksum_verifies(payload: bytes) -> None:
    """complete_checksum over [start, end) with a zero field: the result sums to 0xffff."""
    frame = b"\x00" * 6 + bytes(2) + payload
    done = complete_checksum(frame, 6, 0)
    assert rfc1071_sum(done[6:]) == 0xFFFF
    assert done[:6] == frame[:6] and done[8:] == frame[8:]
