"""A HyperLogLog sketch of distinct members, keyed so that it holds no user id.

Each member is hashed with a keyed BLAKE2b (the deployment's sketch key) to 64 bits: the
top ``PRECISION`` bits pick one of ``M`` registers, the register keeps the largest
"position of the first 1 bit" seen among the rest. A register holds a small number, not
an id, and the same member lands in the same register with the same value, so merging
two sketches (the element-wise maximum) counts a member once however many windows,
shards or days saw it: sketches of windows, shards and days merge without double
counting, which exact per-member sets could only do by keeping the ids.

The estimate is Ertl's improved estimator (no bias over the whole range, no empirical
tables); its relative standard error is 1.04 / sqrt(M) = 1.6 % for M = 4096, and far
less for small sets (measured in ``tests/unit/domain/test_sketch.py``). Registers are stored
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


def _sigma(x: float) -> float:
    if x == 1.0:
        return math.inf
    y, z = 1.0, x
    while True:
        x *= x
        before = z
        z += x * y
        y += y
        if z == before:
            return z


def _tau(x: float) -> float:
    if x in (0.0, 1.0):
        return 0.0
    y, z = 1.0, 1.0 - x
    while True:
        x = math.sqrt(x)
        before = z
        y *= 0.5
        z -= (1.0 - x) ** 2 * y
        if z == before:
            return z / 3.0


def estimate(registers: bytes | bytearray) -> int:
    """The estimated number of distinct members (0 for an empty sketch): Ertl's improved
    estimator ("New cardinality estimation algorithms for HyperLogLog sketches", 2017),
    unbiased over the whole range without the empirical bias tables of HLL++."""
    q = _REST_BITS
    counts = [0] * (q + 2)
    for r in registers:
        counts[r] += 1
    if counts[0] == M:
        return 0
    z = M * _tau(1.0 - counts[q + 1] / M)
    for k in range(q, 0, -1):
        z = 0.5 * (z + counts[k])
    z += M * _sigma(counts[0] / M)
    return round(M * M / (2.0 * math.log(2.0)) / z)


def encode(registers: bytes | bytearray) -> bytes:
    return zlib.compress(bytes(registers), 6)


def decode(data: bytes | None) -> bytearray:
    if not data:
        return bytearray(M)
    registers = bytearray(zlib.decompress(data))
    if len(registers) != M:
        raise ValueError(f"a sketch has {M} registers, not {len(registers)}")
    return registers
