"""A full run ends with the chart and the table of every result, including a benchmark of
several figures with no single value (``delivery``): `make bench` once failed there,
after writing latest.json."""

from __future__ import annotations

from pathlib import Path

from benchmarks.framework import write_chart
from benchmarks.table import markdown

RESULTS = [
    {"name": "ingest_http", "value": 93924.8, "unit": "events/s", "baseline": "raw_copy",
     "baseline_value": 202832.4, "ratio": 0.4631, "met": False},
    {"name": "end_to_end_lag", "value": 8.3, "unit": "s (p99 lag)", "ratio": None},
    {"name": "delivery", "value": None, "unit": None, "baseline": None,
     "baseline_value": None, "ratio": None, "feed_vs_log": 0.141},
]  # fmt: skip


def test_the_chart_draws_a_result_without_a_value(tmp_path: Path) -> None:
    path = write_chart(RESULTS, tmp_path / "chart.png")  # type: ignore[arg-type]
    assert path.stat().st_size > 0


def test_the_table_shows_a_result_without_a_value() -> None:
    row = next(line for line in markdown({"results": RESULTS}).splitlines() if "delivery" in line)
    assert row.startswith("| delivery | — | — |"), row
    assert "None" not in row
