"""A HyperLogLog sketch of distinct members, keyed so that it holds no user id.

Each member is hashed with a keyed BLAKE2b (the deployment's sketch key) to 64 bits: the
top ``PRECISION`` bits pick one of ``M`` registers, the register keeps the largest
"position of the first 1 bit" seen among the rest. A register holds a small number, not
an id, and the same member lands in the same register with the same value, so merging
two sketches (the element-wise maximum) counts a member once however many windows,
shards or days saw it: sketches of windows, shards and days merge without double
counting, which exact per-member sets could only do by keeping the ids.

The relative standard error is 1.04 / sqrt(M) = 1.6 % for M = 4096 (measured in
``tests/unit/domain/test_sketch.py``); below ~10,000 members the small-range correction
(linear counting on the empty registers) is much better than that. Registers are stored
zlib-compressed (a sketch of a few members is mostly zeros: tens of bytes).
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Iterable

PRECISION = 12
M = 1 << PRECISION
_REST_BITS = 64 - PRECISION
_REST_MASK = (1 << _REST_BITS) - 1
_ALPHA = 0.7213 / (1 + 1.079 / M)


def _register(user_id: str, key: bytes) -> tuple[int, int]:
    x = int.from_bytes(hashlib.blake2b(user_id.encode(), key=key, digest_size=8).digest(), "big")
    rest = x & _REST_MASK
    return x >> _REST_BITS, _REST_BITS - rest.bit_length() + 1


def sketch_of(user_ids: Iterable[str], key: bytes) -> bytearray:
    """The registers of a set of members."""
    registers = bytearray(M)
    for user_id in user_ids:
        index, rank = _register(user_id, key)
        if rank > registers[index]:
            registers[index] = rank
    return registers


def merge(a: bytes | bytearray, b: bytes | bytearray) -> bytearray:
    """The sketch of the union (element-wise maximum)."""
    return bytearray(map(max, a, b))


def estimate(registers: bytes | bytearray) -> int:
    """The estimated number of distinct members (0 for an empty sketch)."""
    zeros = registers.count(0)
    if zeros == M:
        return 0
    raw = _ALPHA * M * M / math.fsum(2.0**-r for r in registers)
    if raw <= 2.5 * M and zeros:
        return round(M * math.log(M / zeros))  # linear counting: small ranges
    return round(raw)


def encode(registers: bytes | bytearray) -> bytes:
    return zlib.compress(bytes(registers), 6)


def decode(data: bytes | None) -> bytearray:
    if not data:
        return bytearray(M)
    registers = bytearray(zlib.decompress(data))
    if len(registers) != M:
        raise ValueError(f"a sketch has {M} registers, not {len(registers)}")
    return registers
