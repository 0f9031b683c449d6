"""The distinct-member sketch: its error measured over a range of cardinalities, merges
that never double count, and registers that hold no id."""

from __future__ import annotations

import statistics

from loyalty.domain import sketch

KEY = b"k" * 32


def test_the_error_is_within_the_documented_bound() -> None:
    """1.04 / sqrt(4096) = 1.6 % standard error; measured over 20 keys per size."""
    errors: list[float] = []
    for n in (100, 1_000, 3_000, 10_000, 50_000):  # both sides of the classic 2.5 M switch
        for k in range(20 if n < 50_000 else 4):
            key = bytes([k]) * 32
            got = sketch.estimate(sketch.sketch_of((f"user-{i}" for i in range(n)), key))
            errors.append(abs(got - n) / n)
            assert abs(got - n) / n < 0.05, (n, k, got)  # ~3 standard errors
    assert statistics.fmean(errors) < 0.016  # mean absolute error below one std error


def test_small_counts_are_off_by_one_at_most() -> None:
    for n in range(0, 60):
        assert abs(sketch.estimate(sketch.sketch_of((f"m{i}" for i in range(n)), KEY)) - n) <= 1


def test_merging_counts_a_member_once() -> None:
    a = sketch.sketch_of((f"u{i}" for i in range(0, 6000)), KEY)
    b = sketch.sketch_of((f"u{i}" for i in range(3000, 9000)), KEY)
    union = sketch.estimate(sketch.merge(a, b))
    assert abs(union - 9000) / 9000 < 0.05
    assert sketch.merge(a, a) == a  # merging a window twice changes nothing


def test_stored_registers_round_trip_and_are_small_for_few_members() -> None:
    registers = sketch.sketch_of(["alice", "bob"], KEY)
    stored = sketch.encode(registers)
    assert len(stored) < 100 and b"alice" not in stored
    assert sketch.decode(stored) == registers
    assert sketch.estimate(sketch.decode(None)) == 0


def test_the_key_decides_the_registers() -> None:
    """Without the deployment's key, a register cannot be tied to a user id."""
    assert sketch.sketch_of(["alice"], KEY) != sketch.sketch_of(["alice"], b"x" * 32)
